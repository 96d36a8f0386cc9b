"""Rank-aware logging set-up, called once by each entry point.

Records of the ``pipeline`` logger (and its children, ``logging.getLogger(__name__)`` in every
module) go to the console on rank 0 only, and to one file per rank (the run directory's
``logs/rank<R>.log``) on every rank: what a user reads when rank 5 on host 2 died.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

LOGGER = "pipeline"


_FORMAT = "%(asctime)s {host} rank{rank} %(levelname)s %(name)s: %(message)s"


def setup_logging(
    log_file: str | Path | None = None, *, rank: int, level: int = logging.INFO
) -> Path | None:
    """Rank-aware logging for the ``pipeline`` logger tree; returns ``log_file``.

    Rank 0 prints ``INFO`` and above to stderr as plain messages; other ranks print only
    warnings and errors, prefixed with their rank and host. With ``log_file`` (the run
    directory names it: ``RunDir.log_file(rank)``), every rank also appends everything to it
    (timestamp, host, rank, module). Safe to call again (e.g. once the run directory is
    known): handlers are replaced, not added. ``rank``: this process's rank
    (``pipeline.distributed.group.process_rank()``).
    """
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
    if log_file is None:
        return None
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT.format(host=host, rank=rank)))
    handler.setLevel(logging.DEBUG)
    root.addHandler(handler)
    return path
