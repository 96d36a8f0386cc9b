"""The rank environment and the collectives the pipeline uses.

This is the only module that reads RANK / WORLD_SIZE / SLURM_* variables. Three
environments are recognised:

* torchrun (or submitit's ``TorchDistributedEnvironment``, which exports the same
  names): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, with the host's share
  from LOCAL_WORLD_SIZE and GROUP_RANK (torchrun) or NODE_RANK / SLURM_NODEID;
* a Slurm job step (``srun``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID and
  the tasks per node (SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE or
  SLURM_NTASKS_PER_NODE), with the master address taken from the step's first node;
* nothing: one process.

A partially set environment is an error. Every helper works unchanged with one
process (no process group at all). ``init`` writes the decided values back under the
torchrun names (``export_env``), so libraries that read the environment (DeepSpeed reads
LOCAL_RANK and LOCAL_SIZE) see the same ranks as the pipeline.

Logging: :func:`setup_logging` is called once by each entry point. Records of the
``pipeline`` logger (and its children, ``logging.getLogger(__name__)`` in every module) go
to the console on rank 0 only, and to one file per rank, ``<run dir>/logs/rank<R>.log``,
on every rank: what a user reads when rank 5 on host 2 died.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import UserError
from pipeline.secrets import install_log_filter

T = TypeVar("T")

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID")
# Tasks per node, most specific first: the step's own layout, the job's, the uniform request.
SLURM_LAYOUT_VARS = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")


class DistributedEnvError(UserError, RuntimeError):
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
    local_world_size: int = 1  # ranks on this host
    node_rank: int = 0  # this host's index among the job's hosts


def _int_var(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError as e:
        raise DistributedEnvError(f"{name}={env[name]!r} is not an integer") from e


_TASK_COUNT = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def _tasks_per_node(env: dict, name: str) -> list[int]:
    """Slurm's compressed task counts ('2(x3),1' = hosts with 2, 2, 2 and 1 tasks)."""
    counts: list[int] = []
    for item in env[name].split(","):
        m = _TASK_COUNT.fullmatch(item.strip())
        if m is None or int(m.group(1)) < 1:
            raise DistributedEnvError(
                f"{name}={env[name]!r} is not a Slurm task count list such as '2(x3),1'; "
                "run the job with srun, which sets it"
            )
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _slurm_local_layout(env: dict) -> tuple[int, int]:
    """(tasks on this node, node index) inside a Slurm step."""
    node_rank = _int_var(env, "SLURM_NODEID")
    name = next((v for v in SLURM_LAYOUT_VARS if v in env), None)
    if name is None:
        raise DistributedEnvError(
            f"partial Slurm environment: none of {', '.join(SLURM_LAYOUT_VARS)} is set inside "
            "a job step; run the job with srun, which sets them"
        )
    if name == "SLURM_NTASKS_PER_NODE":
        return _int_var(env, name), node_rank
    counts = _tasks_per_node(env, name)
    if not 0 <= node_rank < len(counts):
        raise DistributedEnvError(
            f"SLURM_NODEID={node_rank} is outside the {len(counts)} nodes of "
            f"{name}={env[name]!r}; the variables come from different steps"
        )
    return counts[node_rank], node_rank


def _torchrun_local_layout(env: dict, world_size: int) -> tuple[int, int]:
    """(ranks on this host, host index) for a torchrun-style environment."""
    if "LOCAL_WORLD_SIZE" in env:
        local_world_size = _int_var(env, "LOCAL_WORLD_SIZE")
    else:
        # The five variables alone (tests, hand-made launches) describe ranks on one host.
        local_world_size = world_size
    for name in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
        if name in env:
            return local_world_size, _int_var(env, name)
    if local_world_size != world_size:
        raise DistributedEnvError(
            f"LOCAL_WORLD_SIZE={local_world_size} is less than WORLD_SIZE={world_size} but "
            "none of GROUP_RANK, NODE_RANK, SLURM_NODEID says which host this is; set NODE_RANK"
        )
    return local_world_size, 0


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
        local_world_size, node_rank = _torchrun_local_layout(env, _int_var(env, "WORLD_SIZE"))
        e = DistEnv(
            rank=_int_var(env, "RANK"),
            world_size=_int_var(env, "WORLD_SIZE"),
            local_rank=_int_var(env, "LOCAL_RANK"),
            master_addr=env["MASTER_ADDR"],
            master_port=_int_var(env, "MASTER_PORT"),
            source="torchrun",
            local_world_size=local_world_size,
            node_rank=node_rank,
        )
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        missing = [v for v in SLURM_VARS if v not in env]
        if missing:
            raise DistributedEnvError(
                f"partial Slurm environment: {', '.join(missing)} missing inside a job step"
            )
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        local_world_size, node_rank = _slurm_local_layout(env)
        e = DistEnv(
            rank=_int_var(env, "SLURM_PROCID"),
            world_size=_int_var(env, "SLURM_NTASKS"),
            local_rank=_int_var(env, "SLURM_LOCALID"),
            master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(env),
            # A port derived from the job id lets two jobs share a node.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            source="slurm",
            local_world_size=local_world_size,
            node_rank=node_rank,
        )
    else:
        return DistEnv(0, 1, 0, "127.0.0.1", 29500, "single", local_world_size=1, node_rank=0)
    if not 0 <= e.rank < e.world_size:
        raise DistributedEnvError(f"rank {e.rank} is outside [0, world size {e.world_size})")
    if e.local_rank < 0 or e.local_rank > e.rank:
        raise DistributedEnvError(
            f"local rank {e.local_rank} is impossible for global rank {e.rank}"
        )
    if not 0 <= e.local_rank < e.local_world_size <= e.world_size:
        raise DistributedEnvError(
            f"local rank {e.local_rank} of {e.local_world_size} ranks on this host does not fit "
            f"a world of {e.world_size} ({e.source} variables); they must satisfy "
            "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE"
        )
    # Hosts before this one hold at least one rank each.
    if e.node_rank < 0 or (e.node_rank > 0 and e.node_rank + e.local_world_size > e.world_size):
        raise DistributedEnvError(
            f"node rank {e.node_rank} with {e.local_world_size} ranks on this host does not fit "
            f"a world of {e.world_size} ({e.source} variables); check NODE_RANK / GROUP_RANK / "
            "SLURM_NODEID against LOCAL_WORLD_SIZE and WORLD_SIZE"
        )
    return e


def export_env(e: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Write ``e`` under the names libraries read: RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT (the process's environment by
    default). ``read_env`` of the result gives ``e`` again.

    DeepSpeed's CPU shared-memory all-reduce assumes every rank is on this host when its
    LOCAL_SIZE equals the world size (deepspeed/ops/csrc/cpu/comm/shm_interface.cpp); unset,
    it counts as 0 and the op stays off. So LOCAL_SIZE is written when the job spans hosts
    (it is then below the world size) or when something already set it (a stale value must
    not claim the whole world is local); a one-host run is left as DeepSpeed treats it today.
    """
    environ = os.environ if environ is None else environ
    environ.update(
        RANK=str(e.rank),
        WORLD_SIZE=str(e.world_size),
        LOCAL_RANK=str(e.local_rank),
        LOCAL_WORLD_SIZE=str(e.local_world_size),
        NODE_RANK=str(e.node_rank),
        MASTER_ADDR=e.master_addr,
        MASTER_PORT=str(e.master_port),
    )
    # torchrun's own name for the host index must not contradict NODE_RANK.
    if "GROUP_RANK" in environ:
        environ["GROUP_RANK"] = str(e.node_rank)
    if "LOCAL_SIZE" in environ or e.local_world_size < e.world_size:
        environ["LOCAL_SIZE"] = str(e.local_world_size)


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
    if env.world_size > 1:
        export_env(env)
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
    # Groups made later with new_group(timeout=None) take torch's module default (30 min),
    # not this group's: DeepSpeed's data-parallel group (deepspeed.utils.groups
    # ._clone_world_group, which ZeRO reduces gradients over) is one, so a host lost during a
    # backward hung the job for 30 minutes (tests/test_multinode.py, lost host).
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
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


def is_collective_error(error: BaseException) -> bool:
    """``error`` is a collective that failed because a peer is gone or too late: torch's
    ``DistError`` (NCCL, the store), or the plain ``RuntimeError`` gloo's transport raises
    (torch 2.14 does not wrap it: "Timed out waiting 30000ms for recv operation", "Application
    timeout caused pair closure", "Connection closed by peer [addr]:port")."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("gloo/transport", "pair closure", "closed by peer", "reset by peer")
    )


def destroy() -> None:
    """Leave and destroy the process group, if there is one (idempotent)."""
    global _exported_local_rank
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _exported_local_rank:
        os.environ.pop("LOCAL_RANK", None)
        _exported_local_rank = False


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``: Python's own exit, without the interpreter's teardown.

    Entry points of processes that may join a process group end with this (``pipeline`` and
    ``launch.task``, the command of every Slurm task), and so do the tests' spawned ranks.

    Why: a gloo worker thread (C++) drops its reference to a finished collective's tensors
    *after* the collective has returned to Python, and that release takes the GIL. If the
    interpreter is tearing down by then, CPython ends the thread with ``pthread_exit``, whose
    unwinding through the C++ destructor calls ``std::terminate``: a rank that finished its
    work aborts ("terminate called without an active exception", exit -6) instead of exiting
    with its code. ``destroy_process_group`` does not join those threads, and DeepSpeed
    holds its groups until its modules are torn down. Issue 9: 1 full test run in 2 lost a
    rank this way; a core dump shows ``ProcessGroupGloo::runLoop`` -> ``~AsyncWork`` ->
    ``TensorImpl::decref_pyobject`` -> ``take_gil`` -> ``pthread_exit`` -> ``std::terminate``
    (``tests/test_exit.py`` reproduces it with a plain exit).

    So: leave the group, then do what a normal exit does while the interpreter is intact (join
    the non-daemon threads, run the ``atexit`` functions: logging, MLflow, multiprocessing's
    children), flush the standard streams, and end the process with ``os._exit``. What is
    skipped is only the teardown (freeing modules and objects); files are closed by then.
    """
    code = int(code)
    try:
        destroy()
    except Exception as e:  # the group is already broken (a peer is gone): exit anyway
        print(f"leaving the process group at exit: {e}", file=sys.stderr)
    shutdown_threads = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first
    if shutdown_threads is not None and threading.current_thread() is threading.main_thread():
        shutdown_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code & 0xFF)


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


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (BatchNorm running statistics), in place.

    All ranks participate. DeepSpeed, unlike torch's DDP, does not broadcast buffers, so with
    trainable BatchNorm each rank would keep statistics of its own batches: the evaluation
    would embed each rank's share with another model, and the saved weights (rank 0's) would
    not be the evaluated ones (issue 10). One flat broadcast per dtype keeps it to a few
    messages per step.
    """
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in module.buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf)
    for bufs in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        dist.broadcast(flat, src=src)
        offset = 0
        for b in bufs:
            n = b.numel()
            b.data.copy_(flat[offset : offset + n].view_as(b))
            offset += n


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
    """Run ``fn()`` on rank 0 only and give its result, or its exception, to every rank.

    All ranks participate (one broadcast), so a failure on rank 0 cannot leave the others
    waiting in a later collective. Every rank raises rank 0's exception itself (same class
    and message, so a user error is one line everywhere); an exception that cannot be sent
    becomes a RuntimeError naming it. The result must be picklable.
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # re-raised on every rank below
            error = e
            try:
                pickle.loads(pickle.dumps(e))
                box[0] = ("error", e)
            except Exception:
                box[0] = ("error", RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}"))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        if error is not None:
            raise error
        raise value
    return value


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (all ranks participate)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def rank_hosts() -> dict[str, list[int]]:
    """Host name -> the ranks on it, the same on every rank (all ranks participate)."""
    host = socket.gethostname()
    if not is_distributed():
        return {host: [0]}
    names: list[Any] = [None] * get_world_size()
    dist.all_gather_object(names, host)
    table: dict[str, list[int]] = {}
    for rank, name in enumerate(names):
        table.setdefault(name, []).append(rank)
    return table


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
    install_log_filter(console)
    root.addHandler(console)
    if run_dir is None:
        return None
    path = log_file(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT.format(host=host, rank=rank)))
    handler.setLevel(logging.DEBUG)
    install_log_filter(handler)
    root.addHandler(handler)
    return path
