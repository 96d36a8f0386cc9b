"""The process group's lifecycle: joining (:func:`process_group`, the one way an entry point
joins), the group of one DeepSpeed needs, bounded collective timeouts, leaving and exiting, and
this process's place in the group. Every helper works unchanged with one process (no group).

Two collective timeouts, as torchtitan has them: the group's own (long) one, given when it is
joined, bounds start-up and whatever waits on one rank's slow work (evaluation, checkpoint
writes, the final export); a short one, switched on with :func:`set_timeout` for the steady
training steps, makes a lost host end the job in minutes. :func:`long_timeout` brings the long
one back around slow work. Switching is local to the process (no collective), so every rank
switches at the same points of the program on its own.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

import torch
import torch.distributed as dist

from pipeline.distributed.env import DistEnv, export_env, read_env

DEFAULT_TIMEOUT_S = 1800.0


"""Collective timeout when an entry point gives none: 30 minutes, as before (torch's default for
gloo; nccl's own is 10), long enough for rank 0's slowest solo work (IJB-C metrics, checkpoint
writes) while the others wait. A job that must notice a lost host sooner passes a shorter
``timeout_s``."""


# Whether ensure_process_group exported LOCAL_RANK (destroy() takes it back).
_exported_local_rank = False
# The group's own timeout (what init was given) and the one in force now (set_timeout).
_long_timeout_s = DEFAULT_TIMEOUT_S
_timeout_s = DEFAULT_TIMEOUT_S


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
    global _long_timeout_s, _timeout_s
    timeout = _timedelta(timeout_s)
    env = _launch_env()
    if env.world_size > 1:
        export_env(env)
    if not dist.is_initialized():
        _long_timeout_s = _timeout_s = float(timeout_s)
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


def set_timeout(timeout_s: float | None = None) -> None:
    """Bound every later collective of every group this process is in by ``timeout_s``
    seconds; None: the group's own timeout again (the one it was joined with).

    Local: no collective and no message to the other ranks, so each rank calls it at the same
    point of the program. Every group counts, not only the job's: DeepSpeed reduces gradients
    over a group of its own (``deepspeed.utils.groups._clone_world_group``), and a lost host
    is noticed by whichever collective waits for it. Collectives already waiting keep the
    timeout they started with.
    """
    global _timeout_s
    seconds = _long_timeout_s if timeout_s is None else float(timeout_s)
    timeout = _timedelta(seconds)
    if dist.is_available() and dist.is_initialized():
        c10d = dist.distributed_c10d
        # torch lists the groups of this process only in its private registry.
        for pg in list(c10d._world.pg_map):
            if not c10d._rank_not_in_group(pg):
                dist.set_timeout(timeout, pg)
    _timeout_s = seconds


def timeout_s() -> float:
    """The collective timeout in force, in seconds. After a collective failed inside
    :func:`long_timeout`, still the long one: the timeout that ran out."""
    return _timeout_s


def long_timeout_s() -> float:
    """The group's own (long) timeout, in seconds: the one it was joined with."""
    return _long_timeout_s


@contextlib.contextmanager
def long_timeout() -> Iterator[None]:
    """Collectives inside the block wait up to the group's own (long) timeout; the timeout in
    force before comes back after it.

    For slow work on one rank while the others wait in a collective: evaluation, checkpoint
    writes, the final export. The waiting ranks are the ones that time out, so every rank
    enters the block at the same point. A collective that fails inside the block leaves the
    long timeout in force (the group is broken; no later collective can succeed), so that
    whoever reports the failure reads in :func:`timeout_s` which timeout ran out.
    """
    before = _timeout_s
    if before == _long_timeout_s:
        yield
        return
    set_timeout(None)
    failed = False
    try:
        yield
    except Exception as e:
        failed = is_collective_error(e)
        raise
    finally:
        if not failed:
            set_timeout(before)


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
    holds its groups until its modules are torn down. Once, 1 full test run in 2 lost a
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


def process_rank() -> int:
    """This process's rank: the group's, or before it joins one, the launch environment's."""
    return get_rank() if is_distributed() else _launch_env().rank


def is_main_process() -> bool:
    return get_rank() == 0


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
