"""One training job per run directory: :class:`RunLock`, held by :func:`held`.

Two ``pipeline train`` commands on the same ``train.output_dir`` corrupted each other's
``latest``. The lock file (its name: :attr:`pipeline.rundir.RunDir.lock`) names host and pid; a
lock whose process is dead (same host) or whose heartbeat stopped (another host, where the pid
cannot be checked) is stale and taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.distributed import collectives, group
from pipeline.errors import UserError
from pipeline.rundir import RunDir

log = logging.getLogger(__name__)


class RunLockError(UserError, RuntimeError):
    """Another live job holds the run directory; the message names it and the fix."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory (``RunDir.lock``), held while a job trains there.

    The file holds ``{"host", "pid", "started"}``; a thread refreshes its mtime every
    ``heartbeat_s``. A lock is stale when its host is this host and its pid is dead, or when
    its mtime is older than ``stale_after_s`` (a job on another host that died without
    removing it). Taking a stale lock over is logged as a warning.
    """

    def __init__(
        self, run_dir: str | Path, heartbeat_s: float = 30.0, stale_after_s: float = 300.0
    ) -> None:
        self.path = RunDir(run_dir).lock
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> str | None:
        """Why the lock ``holder`` is stale, or None while it may be alive."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it disappeared"
        if holder.get("host") == self.host and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return f"process {holder['pid']} on {self.host} is not running"
            return None
        if age > self.stale_after_s:
            return f"its heartbeat stopped {age:.0f} s ago"
        return None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": self.host, "pid": os.getpid(), "started": time.time()}, f)
        return True

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # another process may take over a stale lock at the same moment
            if self._create():
                break
            holder = self._read()
            reason = self._stale(holder)
            if reason is None:
                raise RunLockError(
                    f"{self.path.parent} is in use by another training job (host "
                    f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, lock file "
                    f"{self.path}): wait for it to finish, stop it, or train into another "
                    "train.output_dir; if no such job runs, delete the lock file"
                )
            log.warning(
                "taking over the stale lock %s (host %s, pid %s): %s",
                self.path,
                holder.get("host", "?"),
                holder.get("pid", "?"),
                reason,
            )
            self.path.unlink(missing_ok=True)
        else:
            raise RunLockError(f"could not take the lock {self.path}; retry")
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder.get("pid") == os.getpid() and holder.get("host") == self.host:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def held(run_dir: RunDir | str | Path) -> Iterator[None]:
    """The run lock of ``run_dir`` for the block, taken by rank 0 of the job: the entry point
    holds it around the whole run. All ranks participate: a refusal (another live job) is
    raised on every rank."""
    lock = RunLock(run_dir.root if isinstance(run_dir, RunDir) else run_dir)
    # All ranks participate (one broadcast of rank 0's outcome).
    collectives.on_main(lambda: bool(lock.acquire()))
    try:
        yield
    finally:
        if group.is_main_process():
            lock.release()
