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

import contextlib
import datetime
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")

T = TypeVar("T")


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


DEFAULT_TIMEOUT_S = 1800.0
"""Collective timeout when an entry point gives none: 30 minutes, as before (torch's default for
gloo; nccl's own is 10), long enough for rank 0's slowest solo work (IJB-C metrics, checkpoint
writes) while the others wait. A job that must notice a lost host sooner passes a shorter
``timeout_s``."""


# Whether ensure_process_group exported LOCAL_RANK (destroy() takes it back).
_exported_local_rank = False


def _timedelta(timeout_s: float) -> datetime.timedelta:
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(
            f"timeout_s={timeout_s!r}: a collective timeout must be a positive number of seconds"
        )
    return datetime.timedelta(seconds=float(timeout_s))


def _launch_env() -> DistEnv:
    """:func:`read_env` of the launcher's environment, without the LOCAL_RANK that
    :func:`ensure_process_group` exported for DeepSpeed (alone it reads as a partial
    torchrun environment)."""
    env = dict(os.environ)
    if _exported_local_rank:
        env.pop("LOCAL_RANK", None)
    return read_env(env)


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the process group when there are several processes (idempotent).

    nccl when CUDA is available (and the process is pinned to ``cuda:LOCAL_RANK``),
    gloo otherwise. With one process nothing is initialised. ``timeout_s`` bounds every
    collective of the group: a rank that waits longer for a peer (a lost host) fails
    instead of hanging.
    """
    timeout = _timedelta(timeout_s)
    env = _launch_env()
    if env.world_size == 1 or dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return env
    backend = _backend()
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    return env


def ensure_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """:func:`init`, and for one process a group of one: DeepSpeed needs a group even alone.

    The group of one lives on an in-memory store (no port to pick, no peer to wait for); it
    is the only group this module builds besides :func:`init`'s. Also exports LOCAL_RANK,
    which DeepSpeed reads and ``srun`` (or a single process) does not set; :func:`destroy`
    removes it again, since a stray LOCAL_RANK is a partial torchrun environment to the next
    :func:`read_env` in this process.
    """
    global _exported_local_rank
    env = init(timeout_s)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(env.local_rank)
        _exported_local_rank = True
    if not dist.is_initialized():
        dist.init_process_group(
            _backend(),
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=_timedelta(timeout_s),
        )
    return env


def destroy() -> None:
    """Leave and destroy the process group, if there is one (idempotent)."""
    global _exported_local_rank
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _exported_local_rank:
        os.environ.pop("LOCAL_RANK", None)
        _exported_local_rank = False


@contextlib.contextmanager
def process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistEnv]:
    """An entry point's process group: ``with distributed.process_group(timeout_s=...) as env:``.

    Joins the job's group on entry (:func:`init`: none for one process) and destroys
    whatever group exists on exit, normal or not, including the group of one that
    :func:`ensure_process_group` builds for DeepSpeed inside the block. A group that already
    existed on entry belongs to an outer owner (a test harness, an enclosing entry point) and
    is left to it, so entry points nest.
    """
    owner = not (dist.is_available() and dist.is_initialized())
    env = init(timeout_s)
    try:
        yield env
    finally:
        if owner:
            destroy()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return _launch_env().local_rank if is_distributed() else 0


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


# ---------------------------------------------------------------------------- collectives
# Every collective of the pipeline is here. Each is called by all ranks in the same order,
# never under a rank-0 branch, and returns its input (or runs alone) with one process.


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


def all_gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows in rank order; the row counts may differ, even be 0.

    All ranks participate. Every rank passes the same dtype and the same shape after the
    first axis (a rank with no rows still passes ``(0, *row_shape)``).
    """
    if get_world_size() == 1:
        return local
    dev = device()  # NCCL only moves CUDA tensors
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    counts = all_gather_nograd(n).tolist()
    # all_gather needs equal shapes, hence the padding to the largest count.
    step = max(counts)
    padded = np.zeros((step, *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local
    gathered = all_gather_nograd(torch.from_numpy(padded).to(dev)).cpu().numpy()
    return np.concatenate([gathered[r * step : r * step + c] for r, c in enumerate(counts)])


def all_gather_topk(
    scores_Bk: np.ndarray, ids_Bk: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every rank's top-k lists (scores, ids) for the same query block, in rank order.

    All ranks participate, each with the same (B, k) shapes (its own gallery slice's top-k).
    """
    if get_world_size() == 1:
        return [scores_Bk], [ids_Bk]
    dev = device()  # NCCL only moves CUDA tensors
    # A leading axis of 1 makes the gathered tensor (world, B, k): one slab per rank.
    s = all_gather_nograd(torch.from_numpy(np.ascontiguousarray(scores_Bk))[None].to(dev))
    i = all_gather_nograd(torch.from_numpy(np.ascontiguousarray(ids_Bk))[None].to(dev))
    s, i = s.cpu().numpy(), i.cpu().numpy()
    return list(s), list(i)


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn()`` on rank 0 only and give its result (or its error) to every rank.

    All ranks participate (one broadcast), so a failure on rank 0 cannot leave the others
    waiting in a later collective: they raise RuntimeError naming rank 0's error, and rank 0
    re-raises its own. The result must be picklable.
    """
    if get_world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # re-raised on every rank below
            box[0] = ("error", f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"failed on rank 0: {value}")
    return value


# ---------------------------------------------------------------------------- logging

LOGGER = "pipeline"
_FORMAT = "%(asctime)s {host} rank{rank} %(levelname)s %(name)s: %(message)s"


def log_file(run_dir: str | Path, rank: int) -> Path:
    """The log file of ``rank`` in a run directory."""
    return Path(run_dir) / "logs" / f"rank{rank}.log"


def setup_logging(run_dir: str | Path | None = None, *, level: int = logging.INFO) -> Path | None:
    """Rank-aware logging for the ``pipeline`` logger tree; returns this rank's log file.

    Rank 0 prints ``INFO`` and above to stderr as plain messages; other ranks print only
    warnings and errors, prefixed with their rank and host. With ``run_dir``, every rank also
    appends everything to ``run_dir/logs/rank<R>.log`` (timestamp, host, rank, module). Safe
    to call again (e.g. once the run directory is known): handlers are replaced, not added.
    """
    rank = get_rank() if is_distributed() else _launch_env().rank
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
