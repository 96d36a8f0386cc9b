"""What keeps a training process well-behaved towards its cluster: signals and the death of
its launcher.

* :class:`StopRequest`: SIGTERM (what Slurm sends before it kills a job at its time limit or
  on preemption, when the launcher is not submitit) and SIGUSR1 (``sbatch --signal=USR1@90``)
  ask the trainer to finish the current step, write a checkpoint, mark the MLflow run KILLED
  and exit. The handler only records the request; the trainer polls it between steps and all
  ranks agree on it with one all-reduce (ranks receive the signal at different moments). A
  second signal, or ``grace_s`` without an exit, ends the process at once: a stop never hangs.
  Once the trainer acts on the stop, the handler stays until the process has exited
  (:meth:`StopRequest.until_exit`): the run's end (the MLflow status, the run lock) comes
  after the training loop, and the launcher's last death signal may arrive only then.
* :func:`exit_with_parent`: torchrun starts each rank in its own session, so killing only
  torchrun's process group left the ranks training on their own. On Linux the rank asks the
  kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), which goes through the same
  graceful stop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A repeat of the same signal within this many seconds is the kernel's burst of parent-death
# signals, not a person or a scheduler insisting (who take longer than that).
_BURST_S = 2.0
_PR_SET_PDEATHSIG = 1


class StopRequest:
    """Records SIGTERM/SIGUSR1 for a graceful stop between steps (see the module doc).

    Use as a context manager around the training loop; the previous handlers come back at
    exit. ``grace_s``: after the first signal, the process exits by itself (code 128+signal)
    if it is still running this many seconds later, e.g. blocked in a collective with a lost
    rank. A second signal ends the process at once, except a repeat of the first once the
    parent has died or within ``_BURST_S`` of the previous one (the parent-death signal of
    :func:`exit_with_parent`, which Linux repeats).
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, grace_s: float = 300.0) -> None:
        self.signals = signals
        self.grace_s = grace_s
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None
        self._parent = os.getppid()
        self._last = 0.0  # when the latest signal came (time.monotonic)
        self._until_exit = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now, last = time.monotonic(), self._last
        self._last = now
        if self.signum is not None:
            repeated = signum == self.signum and (
                os.getppid() != self._parent or now - last < _BURST_S
            )
            if repeated:
                # The launcher died: Linux sends the parent-death signal again each time this
                # process is handed to another of the dying launcher's threads, in a burst
                # and often before the process is reparented, and once more when it is
                # handed to init (seen when torchrun was SIGKILLed: the ranks exited without
                # their checkpoint). One stop; grace_s bounds it.
                return
            # A second signal: the user or the scheduler insists.
            os._exit(128 + signum)
        self.signum = signum
        self._timer = threading.Timer(self.grace_s, os._exit, args=(128 + signum,))
        self._timer.daemon = True
        self._timer.start()

    def __enter__(self) -> StopRequest:
        self._parent = os.getppid()
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def until_exit(self) -> None:
        """The stop ends the process: keep the handler and the ``grace_s`` bound past the
        block, until the process has exited.

        The launcher's death reaches a rank as a burst of signals that ends when the last of
        the launcher's threads is gone, which on a loaded machine can be after the rank has
        checkpointed and left the training loop: with the previous handler back (the
        default: terminate), that last signal killed the rank while it was ending its MLflow
        run, which stayed RUNNING (about one run in three of the SIGKILLed torchrun test).
        """
        self._until_exit = True

    def __exit__(self, *exc: object) -> None:
        if self._until_exit and self.requested:
            return
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
