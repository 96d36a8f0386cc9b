"""``pipeline`` with a gate in the training loop, for tests/test_reliability.py.

Run exactly like the CLI (``python -m tests.gated_train train --config ...``, also under
torchrun). With ``GATE_STEP=S`` and ``GATE_DIR=DIR`` in the environment, each rank listed in
``GATE_RANKS`` (default all) stops before its step S+1, writes ``DIR/rank<R>.json`` (its pid,
step and MLflow run id) and waits until it has recorded a stop signal (SIGTERM/SIGUSR1,
pipeline.train.signals.StopRequest); then the step runs as usual. So a test signals, or
SIGKILLs, a job at a known step instead of racing its progress: a signal recorded at the
gate makes the job stop after step S+1. With ``GATE_AFTER_STOP=1`` too, a rank that stops on
a signal it recorded waits once more after the training loop, before the run ends (its MLflow
status, the run lock): it writes ``DIR/stopped<R>.json`` (its pid) and waits until it has
recorded one more stop signal, as a launcher's last death signal can come late. A rank that
waits longer than ``GATE_TIMEOUT_S`` (default 600) exits with code 99, so that a failed test
leaves no process behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _wait_for(done, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            os._exit(99)
        time.sleep(0.05)


def _record(where: Path, name: str, record: dict) -> None:
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / f".{name}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(where / name)


def _install(
    step: int, ranks: set[int] | None, where: Path, timeout_s: float, after_stop: bool
) -> None:
    from pipeline.train.hooks import HostMetrics
    from pipeline.train.signals import StopRequest
    from pipeline.train.trainer import Trainer

    signalled: list[int] = []  # a plain flag: a signal handler must not take locks
    handle, train_step, close = StopRequest._handle, Trainer.train_step, HostMetrics.close

    def _handle(self, signum, frame):
        handle(self, signum, frame)
        signalled.append(signum)

    def gated_step(self, images, labels, **kw):
        if self.step == step and (ranks is None or self.rank in ranks):
            record = {"pid": os.getpid(), "step": self.step, "run_id": self.tracker.run_id}
            _record(where, f"rank{self.rank}.json", record)
            _wait_for(lambda: signalled, timeout_s)
        return train_step(self, images, labels, **kw)

    def gated_close(self):  # called after the training loop, before the run ends
        if signalled:
            seen = len(signalled)
            _record(where, f"stopped{os.environ['RANK']}.json", {"pid": os.getpid()})
            _wait_for(lambda: len(signalled) > seen, timeout_s)
        close(self)

    StopRequest._handle = _handle
    Trainer.train_step = gated_step
    if after_stop:
        HostMetrics.close = gated_close


def main() -> int:
    if "GATE_STEP" in os.environ:
        ranks = os.environ.get("GATE_RANKS")
        _install(
            int(os.environ["GATE_STEP"]),
            None if not ranks else {int(r) for r in ranks.split(",")},
            Path(os.environ["GATE_DIR"]),
            float(os.environ.get("GATE_TIMEOUT_S", "600")),
            os.environ.get("GATE_AFTER_STOP") == "1",
        )
    from pipeline.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    from pipeline.cli import end, exit_code

    end(exit_code(main))  # as the pipeline command ends a rank
