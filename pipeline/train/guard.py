"""What keeps a training process well-behaved towards its cluster: signals, a run lock, and
the death of its launcher.

* :class:`StopRequest`: SIGTERM (what Slurm sends before it kills a job at its time limit or
  on preemption, when the launcher is not submitit) and SIGUSR1 (``sbatch --signal=USR1@90``)
  ask the trainer to finish the current step, write a checkpoint, mark the MLflow run KILLED
  and exit. The handler only records the request; the trainer polls it between steps and all
  ranks agree on it with one all-reduce (ranks receive the signal at different moments). A
  second signal, or ``grace_s`` without an exit, ends the process at once: a stop never hangs.
* :class:`RunLock`: one training job per run directory. Two ``pipeline train`` commands on
  the same ``train.output_dir`` corrupted each other's ``latest`` (issue 10). The lock file
  names host and pid; a lock whose process is dead (same host) or whose heartbeat stopped
  (another host, where the pid cannot be checked) is stale and taken over with a warning.
* :func:`exit_with_parent`: torchrun starts each rank in its own session, so killing only
  torchrun's process group left the ranks training on their own. On Linux the rank asks the
  kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), which goes through the same
  graceful stop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

from pipeline.errors import UserError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A repeat of the same signal within this many seconds is the kernel's burst of parent-death
# signals, not a person or a scheduler insisting (who take longer than that).
_BURST_S = 2.0
_PR_SET_PDEATHSIG = 1


class RunLockError(UserError, RuntimeError):
    """Another live job holds the run directory; the message names it and the fix."""


class StopRequest:
    """Records SIGTERM/SIGUSR1 for a graceful stop between steps (see the module doc).

    Use as a context manager around the training loop; the previous handlers come back at
    exit. ``grace_s``: after the first signal, the process exits by itself (code 128+signal)
    if it is still running this many seconds later, e.g. blocked in a collective with a lost
    rank. A second signal ends the process at once, except a repeat of the first once the
    parent has died (the parent-death signal of :func:`exit_with_parent`, which Linux repeats).
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, grace_s: float = 300.0) -> None:
        self.signals = signals
        self.grace_s = grace_s
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None
        self._parent = os.getppid()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            repeated = signum == self.signum and (
                os.getppid() != self._parent or time.monotonic() - self._since < _BURST_S
            )
            if repeated:
                # The launcher died: Linux sends the parent-death signal again each time this
                # process is handed to another of the dying launcher's threads, in a burst
                # and often before the process is reparented (issue 10: torchrun SIGKILLed,
                # the ranks exited without their checkpoint). One stop; grace_s bounds it.
                return
            # A second signal: the user or the scheduler insists.
            os._exit(128 + signum)
        self.signum = signum
        self._since = time.monotonic()
        self._timer = threading.Timer(self.grace_s, os._exit, args=(128 + signum,))
        self._timer.daemon = True
        self._timer.start()

    def __enter__(self) -> StopRequest:
        self._parent = os.getppid()
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False elsewhere.

    If the parent is already gone (the launcher died while this rank started), the signal is
    raised at once.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None or not hasattr(os, "getppid"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # died between the two calls
        os.kill(os.getpid(), sig)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory (``<dir>/.lock``), held while a job trains there.

    The file holds ``{"host", "pid", "started"}``; a thread refreshes its mtime every
    ``heartbeat_s``. A lock is stale when its host is this host and its pid is dead, or when
    its mtime is older than ``stale_after_s`` (a job on another host that died without
    removing it). Taking a stale lock over is logged as a warning.
    """

    FILE = ".lock"

    def __init__(
        self, run_dir: str | Path, heartbeat_s: float = 30.0, stale_after_s: float = 300.0
    ) -> None:
        self.path = Path(run_dir) / self.FILE
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
