"""Run a function in several real gloo processes (for the 2-process tests)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch.multiprocessing as mp

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, world_size: int, port: int, timeout_s: float, fn: Callable, args: tuple
) -> None:
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


def run_distributed(fn: Callable, world_size: int, *args, timeout_s: float = 120) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by gloo.

    ``fn`` must be a module-level function (it is pickled); results travel through
    files the caller names in ``args``. A failure in any process fails the call.
    ``timeout_s`` bounds each collective, so a test that leaves a rank behind fails
    instead of hanging.
    """
    saved = {k: os.environ.pop(k) for k in _ENV if k in os.environ}
    try:
        mp.spawn(
            _entry,
            args=(world_size, free_port(), timeout_s, fn, args),
            nprocs=world_size,
            join=True,
        )
    finally:
        os.environ.update(saved)
