"""``pipeline train``: Smooth-AP training with DeepSpeed, one process, torchrun or srun.

:func:`train` is what entry points call, inside the job's process group
(``pipeline.distributed.group.process_group``): it holds the run lock (pipeline.train.runlock) around the
whole run, plans it on rank 0 (pipeline.train.plan), builds its parts (pipeline.train.build)
and trains them with a :class:`pipeline.train.trainer.Trainer`. The same call resumes from the
run directory's newest complete checkpoint, and on a finished run returns the recorded result
(refused in one line when the config would train it more or differently:
pipeline.train.finished).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from pipeline import logs
from pipeline.config.load import load_config
from pipeline.config.runconfig import RunConfig
from pipeline.data.transforms import resolve_crop
from pipeline.distributed import env, group
from pipeline.rundir import RunDir
from pipeline.train import runlock
from pipeline.train.build import build_components
from pipeline.train.plan import plan_run
from pipeline.train.signals import exit_with_parent
from pipeline.train.trainer import Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (conf/experiments/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. optim.lr=0.0001 train.output_dir=runs/x",
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    # Joins the job's group with the run's collective timeout and always leaves it.
    with group.process_group(timeout_s=cfg.train.collective_timeout_s):
        result = train(cfg)
        if group.is_main_process():
            # stdout carries exactly this line (scripts parse it); messages go to the log.
            print(json.dumps({k: result[k] for k in ("step", "metrics", "weights", "run_id")}))
    return 0


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes; returns its result on every rank.

    Runs on every rank of the job, inside its process group. The result: ``step``, ``run_id``
    (MLflow, rank 0), ``tracking_uri``, ``metrics`` (final evaluation), ``weights`` (fp32
    ``.safetensors``), ``resumed_from`` (step or None), ``output_dir``.
    """
    # The training splits' face crop picks the transforms; a mismatched eval split is refused.
    cfg = replace(cfg, data=resolve_crop(cfg.data, train=True))
    rank = group.process_rank()
    logs.setup_logging(RunDir.of(cfg).log_file(rank), rank=rank)
    with open_trainer(cfg) as trainer:
        return trainer.train()


@contextmanager
def open_trainer(cfg: RunConfig) -> Iterator[Trainer]:
    """The run lock, the plan, the parts and the :class:`Trainer` of ``cfg``; the lock and
    the tracking run are released when the block ends. All ranks participate."""
    if not torch.distributed.is_initialized():
        launched = env.read_env().world_size
        assert launched == 1, (
            f"{launched} ranks launched but this one has joined no process group: call "
            "train() inside group.process_group(...), as the entry points do"
        )
    world = group.get_world_size()
    if world > 1:
        exit_with_parent()  # torchrun starts ranks in their own sessions
    # All ranks participate: rank 0 holds the lock; its refusal is raised on every rank.
    with runlock.held(RunDir.of(cfg)):
        plan = plan_run(cfg, world)
        cfg = plan.apply(cfg)
        with Trainer(cfg, plan, build_components(cfg, plan)) as trainer:
            yield trainer
