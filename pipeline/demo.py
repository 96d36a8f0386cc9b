"""``pipeline demo``: the whole pipeline on one CPU machine in a few minutes.

1. writes the built-in synthetic shards if they are absent (``pipeline make-shards synthetic``);
2. evaluates the untrained model on the held-out classes (the exact initial weights of the
   training run: same ``train.seed``);
3. trains it with 2 processes (``torchrun``: DeepSpeed's CPU accelerator, gloo), which
   evaluates again at the end;
4. prints R@1, R@4 and mAP@R untrained vs trained, and the command that opens MLflow on the
   run (both evaluations are in it: the untrained one at step 0).

Every demo run trains into a fresh ``runs/demo-<time>/``; the MLflow store is shared, so the
runs line up in one UI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline import logs
from pipeline.config.load import CONF_DIR
from pipeline.config.rules import load_checked
from pipeline.config.runconfig import RunConfig
from pipeline.data import make_shards
from pipeline.distributed import group
from pipeline.errors import UserError
from pipeline.eval.evaluator import evaluate_model, tracked_metrics
from pipeline.model import build_model
from pipeline.rundir import RunDir
from pipeline.secrets import strip_uri
from pipeline.tracking.mlflow import run_page
from pipeline.tracking.session import tracking_session

log = logging.getLogger(__name__)

DEFAULT_CONFIG = CONF_DIR / "demo.yaml"
TABLE_METRICS = ("recall@1", "recall@4", "map@r")
TARGET_GAIN = 0.2
"""The demo's promise: trained mAP@R at least this much above the untrained model's."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (conf/demo.yaml)")
    parser.add_argument(
        "--data", default="data/synthetic", help="synthetic shards (written if absent)"
    )
    parser.add_argument("--runs", default="runs", help="where runs/demo-<time>/ goes")
    parser.add_argument("--procs", type=int, default=2, help="training processes (gloo on CPU)")
    syn = parser.add_argument_group("synthetic shards (when they are written)")
    syn.add_argument("--classes", type=int, default=500, help="train classes")
    syn.add_argument("--test-classes", type=int, default=100, help="held-out classes")
    syn.add_argument("--images-per-class", type=int, default=20)
    syn.add_argument("--image-size", type=int, default=64)
    syn.add_argument(
        "--samples-per-shard", type=int, default=1000, help="every rank needs its own shards"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def _write_shards(args: argparse.Namespace) -> None:
    data = Path(args.data)
    if (data / "train" / "index.parquet").is_file() and (data / "test" / "index.parquet").is_file():
        log.info("using the synthetic shards in %s", data)
        return
    log.info("writing synthetic shards to %s ...", data)
    argv = [
        "synthetic",
        "--out",
        str(data),
        "--classes",
        str(args.classes),
        "--test-classes",
        str(args.test_classes),
        "--images-per-class",
        str(args.images_per_class),
        "--image-size",
        str(args.image_size),
        "--samples-per-shard",
        str(args.samples_per_shard),
        "--workers",
        str(max(os.cpu_count() or 1, 1)),
        "--no-progress",
        # No --overwrite: --data may name a folder with the user's own shards in it; a split
        # already there is refused in one line (pipeline.data.outdir), never replaced.
    ]
    # A refused output folder is a one-line error of `pipeline demo` itself (the CLI prints it).
    parser = argparse.ArgumentParser(prog="pipeline make-shards")
    make_shards.add_arguments(parser)
    make_shards.run(parser.parse_args(argv))


def _untrained_metrics(cfg: RunConfig) -> dict[str, float]:
    """Metrics of the model the training run starts from (one process)."""
    torch.manual_seed(cfg.train.seed)  # what pipeline.train.build does before building the model
    model = build_model(cfg.model).eval()
    return evaluate_model(model, cfg.data, cfg.eval, device="cpu", progress=False)


def _table(before: dict[str, float], after: dict[str, float]) -> str:
    head = f"{'':<12}" + "".join(f"{m:>10}" for m in TABLE_METRICS)
    rows = [
        f"{name:<12}" + "".join(f"{vals[m]:>10.3f}" for m in TABLE_METRICS)
        for name, vals in (("untrained", before), ("trained", after))
    ]
    gain = f"{'gain':<12}" + "".join(f"{after[m] - before[m]:>+10.3f}" for m in TABLE_METRICS)
    return "\n".join([head, *rows, gain])


class _TrainingFailed(RuntimeError):
    pass


class DemoError(UserError, ValueError):
    """A demo option out of range."""


def _train(args: argparse.Namespace, overrides: list[str], uri: str, out: Path) -> dict:
    """``pipeline train`` in ``args.procs`` processes (torchrun); returns its result."""
    log.info("training with %d processes (DeepSpeed on CPU, gloo) ...", args.procs)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.procs}",
        "-m",
        "pipeline.cli",
        "train",
        "--config",
        args.config,
        # The children find credentials in the environment they inherit, not on command lines.
        *map(strip_uri, overrides),
        f"tracking.uri={uri}" if uri else "tracking.enabled=false",
    ]
    cores = os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(cores // args.procs, 1)))

    if not torch.cuda.is_available():
        # Naming DeepSpeed's CPU accelerator skips its GPU probe (and its warning).
        env.setdefault("DS_ACCELERATOR", "cpu")
    if subprocess.run(cmd, env=env).returncode != 0:
        raise _TrainingFailed(f"training failed; its files (and logs/) are in {out}")
    return RunDir(out).read_result()


def run(args: argparse.Namespace) -> int:
    if args.procs < 1:
        raise DemoError(
            f"--procs {args.procs}: the demo trains in at least 1 process; pass --procs 1 or "
            "more (default 2)"
        )
    start = time.time()
    data = Path(args.data)
    run_dir = RunDir(Path(args.runs) / time.strftime("demo-%Y%m%d-%H%M%S"))
    overrides = [
        f"data.train=[{{name: synthetic, urls: {data / 'train'}}}]",
        f"data.eval_urls={data / 'test'}",
        f"train.output_dir={run_dir.root}",
        *args.overrides,
    ]
    cfg = load_checked(args.config, overrides)
    rank = group.process_rank()
    logs.setup_logging(run_dir.log_file(rank), rank=rank)
    _write_shards(args)

    log.info("evaluating the untrained model on the held-out classes ...")
    before = _untrained_metrics(cfg)
    # The run starts here, with the untrained evaluation at step 0; `pipeline train`
    # continues it (the session writes the run id into the run directory, where it looks).
    tracking = replace(cfg.tracking, run_name=cfg.tracking.run_name or run_dir.root.name)
    try:
        with tracking_session(
            tracking, is_main=True, run_dir=run_dir.root, tags={"demo": "true"}
        ) as tracker:
            tracker.log_metrics(tracked_metrics(before), 0)
            result = _train(args, overrides, tracker.uri, run_dir.root)
    except _TrainingFailed as e:
        raise SystemExit(f"[demo] {e}") from None
    after = result["metrics"]

    # stdout: the demo's report (the table and where to look); progress went to the log.
    gain = after["map@r"] - before["map@r"]
    verdict = "met" if gain >= TARGET_GAIN else "NOT met"
    print()
    print(_table(before, after))
    print(
        f"\n[demo] mAP@R gain {gain:+.3f} (target +{TARGET_GAIN}: {verdict}); "
        f"{result['step']} steps; total {time.time() - start:.0f} s"
    )
    print(f"[demo] run directory: {run_dir.root}  (weights: {result['weights']})")
    if tracker.run_id:
        page = run_page(tracker.uri, tracker.experiment_id, tracker.run_id)
        print(f"[demo] MLflow run {tracker.run_id}; open it with:\n    {page}")
    run_dir.demo.write_text(
        json.dumps(
            {"untrained": before, "trained": after, "seconds": time.time() - start}, indent=1
        )
    )
    return 0
