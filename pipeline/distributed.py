"""The rank environment and the collectives the pipeline uses.

This is the only module that reads RANK / WORLD_SIZE / SLURM_* variables. Three
environments are recognised:

* torchrun (or submitit's ``TorchDistributedEnvironment``, which exports the same
  names): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
* a Slurm job step (``srun``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with the
  master address taken from the step's first node;
* nothing: one process.

A partially set environment is an error. Every helper works unchanged with one
process (no process group at all).

Logging: :func:`setup_logging` is called once by each entry point. Records of the
``pipeline`` logger (and its children, ``logging.getLogger(__name__)`` in every module) go
to the console on rank 0 only, and to one file per rank, ``<run dir>/logs/rank<R>.log``,
on every rank: what a user reads when rank 5 on host 2 died.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


class DistributedEnvError(RuntimeError):
    """The rank environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # 'torchrun', 'slurm' or 'single'


def _int_var(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError as e:
        raise DistributedEnvError(f"{name}={env[name]!r} is not an integer") from e


def _slurm_master_addr(env: dict) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise DistributedEnvError(
            "SLURM_PROCID is set but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is: "
            "run the job with srun, or set MASTER_ADDR and MASTER_PORT"
        )
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # A single host name needs no expansion.
        if "[" not in nodelist and "," not in nodelist:
            return nodelist
        raise DistributedEnvError(
            f"cannot expand the Slurm node list {nodelist!r} (scontrol failed): set MASTER_ADDR"
        ) from None


def read_env(env: dict | None = None) -> DistEnv:
    """Decide rank, world size and rendezvous from the environment (no side effects)."""
    env = dict(os.environ if env is None else env)
    present = [v for v in TORCHRUN_VARS if v in env]
    if present:
        missing = [v for v in TORCHRUN_VARS if v not in env]
        if missing:
            raise DistributedEnvError(
                f"partial torchrun environment: {', '.join(present)} set but "
                f"{', '.join(missing)} missing; launch with torchrun or srun, "
                f"or unset {', '.join(present)} to run as one process"
            )
        e = DistEnv(
            rank=_int_var(env, "RANK"),
            world_size=_int_var(env, "WORLD_SIZE"),
            local_rank=_int_var(env, "LOCAL_RANK"),
            master_addr=env["MASTER_ADDR"],
            master_port=_int_var(env, "MASTER_PORT"),
            source="torchrun",
        )
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        missing = [v for v in SLURM_VARS if v not in env]
        if missing:
            raise DistributedEnvError(
                f"partial Slurm environment: {', '.join(missing)} missing inside a job step"
            )
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        e = DistEnv(
            rank=_int_var(env, "SLURM_PROCID"),
            world_size=_int_var(env, "SLURM_NTASKS"),
            local_rank=_int_var(env, "SLURM_LOCALID"),
            master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(env),
            # A port derived from the job id lets two jobs share a node.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            source="slurm",
        )
    else:
        return DistEnv(0, 1, 0, "127.0.0.1", 29500, "single")
    if not 0 <= e.rank < e.world_size:
        raise DistributedEnvError(f"rank {e.rank} is outside [0, world size {e.world_size})")
    if e.local_rank < 0 or e.local_rank > e.rank:
        raise DistributedEnvError(
            f"local rank {e.local_rank} is impossible for global rank {e.rank}"
        )
    return e


def init(timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group when there are several processes (idempotent).

    nccl when CUDA is available (and the process is pinned to ``cuda:LOCAL_RANK``),
    gloo otherwise. With one process nothing is initialised.
    """
    env = read_env()
    if env.world_size == 1 or dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return env
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return env


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return read_env().local_rank if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    # All ranks participate.
    if is_distributed():
        dist.barrier()


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_nograd(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (equal shapes; no gradient).

    All ranks participate. For labels, indices and other non-differentiable data.
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        ctx.n = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every rank's embeddings, so the gradient of
        # a rank's slice is the sum over ranks of their gradients for that slice.
        # All ranks participate (the backward passes run in lockstep).
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, carrying gradients back to owners.

    All ranks participate; every rank must pass the same shape.
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; all ranks participate)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


# ---------------------------------------------------------------------------- logging

LOGGER = "pipeline"
_FORMAT = "%(asctime)s {host} rank{rank} %(levelname)s %(name)s: %(message)s"


def log_file(run_dir: str | Path, rank: int) -> Path:
    """The log file of ``rank`` in a run directory (its layout: pipeline.rundir)."""
    from pipeline.rundir import RunDir

    return RunDir(run_dir).log_file(rank)


def setup_logging(run_dir: str | Path | None = None, *, level: int = logging.INFO) -> Path | None:
    """Rank-aware logging for the ``pipeline`` logger tree; returns this rank's log file.

    Rank 0 prints ``INFO`` and above to stderr as plain messages; other ranks print only
    warnings and errors, prefixed with their rank and host. With ``run_dir``, every rank also
    appends everything to ``run_dir/logs/rank<R>.log`` (timestamp, host, rank, module). Safe
    to call again (e.g. once the run directory is known): handlers are replaced, not added.
    """
    rank = get_rank() if is_distributed() else read_env().rank
    host = socket.gethostname()
    root = logging.getLogger(LOGGER)
    root.setLevel(level)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stderr)
    if rank == 0:
        console.setFormatter(logging.Formatter("%(message)s"))
        console.setLevel(level)
    else:
        console.setFormatter(logging.Formatter(f"[rank{rank} {host}] %(levelname)s: %(message)s"))
        console.setLevel(logging.WARNING)
    root.addHandler(console)
    if run_dir is None:
        return None
    path = log_file(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT.format(host=host, rank=rank)))
    handler.setLevel(logging.DEBUG)
    root.addHandler(handler)
    return path
