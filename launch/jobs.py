"""What runs inside a submitted job: the distributed environment, then the library's own code.

Each callable is pickled by submitit and called once in every task (rank) of the job. It
exports the torch.distributed rendezvous variables from the Slurm (or local) job environment,
then calls exactly what ``pipeline train`` / ``pipeline evaluate`` call.

Requeue: on preemption or near the time limit Slurm sends USR2; submitit's handler on
rank 0 calls ``checkpoint()``, stores the returned resubmission and requeues the job. Nothing is
saved from the signal handler: training checkpoints are collective and periodic
(``train.checkpoint_every``), and the resubmitted job simply calls ``train`` again with the same
config, which resumes from the latest checkpoint and continues the same MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import submitit
from submitit.core.job_environment import JobEnvironment

from pipeline.config.runconfig import RunConfig
from pipeline.distributed import group
from pipeline.distributed.env import export_env, read_env
from pipeline.eval.evaluator import run
from pipeline.rundir import EvalDir, RunDir
from pipeline.train.entry import train

# A child of the pipeline logger: the entry points' setup_logging routes it (rank 0 prints,
# every rank writes <run dir>/logs/rank<R>.log).
log = logging.getLogger("pipeline.launch.jobs")


def export_distributed_env() -> dict[str, str]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for ``pipeline.distributed.env``.

    ``set_cuda_visible_devices=False``: every task sees all GPUs of its node and DeepSpeed picks
    ``cuda:LOCAL_RANK`` itself; ``overwrite=True`` because the job, not the environment the job
    was submitted from, decides the ranks.
    """
    env = submitit.helpers.TorchDistributedEnvironment()
    env.export(set_cuda_visible_devices=False, overwrite=True)
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    exported = {k: os.environ[k] for k in names}
    print(
        f"[launch] job {os.environ.get('SLURM_JOB_ID', env._job_env.job_id)} on "
        f"{socket.gethostname()}: rank {env.rank}/{env.world_size}, local rank "
        f"{env.local_rank}, rendezvous {env.master_addr}:{env.master_port}, restart "
        f"{os.environ.get('SLURM_RESTART_COUNT', '0')}",
        flush=True,
    )
    return exported


# What each rank records about its placement (see record_rank_env).
RANK_ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK")
RANK_ENV_NAMES += ("MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")


def record_rank_env(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/launch/rank<R>.json``: the rank variables this task trains with, its
    host and Slurm job; returns the file.

    The variables are those ``pipeline.distributed.group.init`` exports (it is idempotent and is
    called again by the training itself), so the record holds what DeepSpeed reads too,
    LOCAL_SIZE included. Written before training, so a rank that fails still says where it
    ran; a requeued job overwrites it. What a user reads when one host of a job misbehaves,
    and what the multi-host tests assert on.
    """
    env = read_env()
    if env.world_size > 1:
        export_env(env)
    path = RunDir(run_dir).launch_record(env.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "env": {k: os.environ.get(k) for k in RANK_ENV_NAMES},
        "host": socket.gethostname(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }
    path.write_text(json.dumps(record, indent=1))
    return path


def guard_requeue_signal() -> None:
    """Let only this process act on the requeue signal, not its forked children.

    Slurm signals every process of a job step, and DataLoader workers forked from a task
    inherit submitit's USR2 handler: without this guard a worker would also checkpoint,
    call ``scontrol requeue`` and exit, killing the data pipeline of the main process.
    """
    sig = JobEnvironment._usr_sig()
    handler = signal.getsignal(sig)
    if not callable(handler):
        return  # not inside a submitit job (e.g. a direct call in a test)
    owner = os.getpid()

    def only_in_owner(signum: int, frame: Any) -> None:
        if os.getpid() == owner:
            handler(signum, frame)

    signal.signal(sig, only_in_owner)


class TrainJob(submitit.helpers.Checkpointable):
    """Run ``pipeline.train.entry.train(cfg)`` in every task; requeued jobs resume from the checkpoint.

    Returns (per task) the dict ``train`` returns.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> dict:
        guard_requeue_signal()
        export_distributed_env()
        record_rank_env(self.cfg.train.output_dir)
        # train() sets up the rank-aware logging into the run directory. The job joins the
        # group with the run's collective timeout and always leaves it, as `pipeline train`.
        with group.process_group(timeout_s=self.cfg.train.collective_timeout_s):
            return train(self.cfg)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The same call again: train() finds the latest collective checkpoint in
        # train.output_dir and the MLflow run id stored in it.
        log.warning("requeue signal: resubmitting; the job resumes from the latest checkpoint")
        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg))


class EvaluateJob(submitit.helpers.Checkpointable):
    """Run ``pipeline evaluate`` (``pipeline.eval.evaluator.run``) in every task.

    ``overrides`` holds the config overrides and ``weights`` the trained weights, exactly as on
    the ``pipeline evaluate`` command line. Returns the metrics it wrote (``metrics.json`` in
    ``metrics_dir``). A requeued evaluation starts again (it keeps no state).
    """

    def __init__(self, config: str, overrides: list[str], metrics_dir: str, weights: str) -> None:
        self.config, self.overrides, self.metrics_dir = config, overrides, metrics_dir
        self.weights = weights

    def __call__(self) -> dict:
        guard_requeue_signal()
        export_distributed_env()

        # run() sets up the rank-aware logging into the evaluation's directory.
        # A job pickled before --weights existed holds checkpoint=PATH among its overrides.
        weights = getattr(self, "weights", None)
        args = argparse.Namespace(
            config=self.config, overrides=list(self.overrides), weights=weights
        )
        code = run(args)
        if code:
            raise RuntimeError(f"pipeline evaluate exited with {code}")
        return EvalDir(self.metrics_dir).read_metrics()
