"""Run a function in several real gloo processes (for the 2-process tests).

The ranks are forked from a fork server that has already imported torch, DeepSpeed, timm and
the package's distributed and model modules, once per session: a rank started by plain spawn
pays those imports again (1.5-4.7 CPU-seconds each), which was most of the cost of the fast
tier's 2-process tests on 2 cores (benchmarks/rank_start.py times both). The server is a fresh
interpreter, not a fork of pytest, so no test's state (threads, CUDA, monkeypatches) reaches
a rank; each rank takes the caller's current environment and working directory, as spawn did.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable

import torch.multiprocessing as mp

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Imported once by the fork server; every rank starts with them in memory. Their imports leave
# two native threads beside the main one, both made for forks: numpy's OpenBLAS pool (stopped
# by its pthread_atfork handler before a fork, started again on first use) and jemalloc's
# background thread (jemalloc's own fork handlers).
PRELOAD = (
    "torch",
    "deepspeed",
    "timm",
    "pipeline.distributed.group",
    "pipeline.model",
    "pipeline.train.engine",
)
START_METHOD = os.environ.get("SMOOTHAP_TEST_START_METHOD", "forkserver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    env: dict[str, str],
    cwd: str,
    fn: Callable,
    args: tuple,
) -> None:
    # The caller's environment and directory now (a fork server keeps those of its start).
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from pipeline.distributed import group

    with group.process_group(timeout_s=timeout_s):
        fn(rank, world_size, *args)
    # As a real rank ends (pipeline.cli.end): a plain return would exit through the
    # interpreter's teardown, where a gloo thread can abort the process (tests/test_exit.py). A failure
    # raises instead, so mp.spawn reports the worker's traceback.
    group.exit_process(0)


def _start_method() -> str:
    """``forkserver`` with :data:`PRELOAD` (set before the server's first start), or what
    ``SMOOTHAP_TEST_START_METHOD`` names (``spawn``: the plain way, for comparison)."""
    if START_METHOD == "forkserver":
        context = multiprocessing.get_context("forkserver")
        if not getattr(context, "_smoothap_preload_set", False):
            context.set_forkserver_preload(list(PRELOAD))
            context._smoothap_preload_set = True
    return START_METHOD


def run_distributed(fn: Callable, world_size: int, *args, timeout_s: float = 120) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by gloo.

    ``fn`` must be a module-level function (it is pickled); results travel through
    files the caller names in ``args``. A failure in any process fails the call.
    ``timeout_s`` bounds each collective, so a test that leaves a rank behind fails
    instead of hanging.
    """
    env = {k: v for k, v in os.environ.items() if k not in _ENV}
    mp.start_processes(
        _entry,
        args=(world_size, free_port(), timeout_s, env, os.getcwd(), fn, args),
        nprocs=world_size,
        join=True,
        start_method=_start_method(),
    )
