"""``pipeline`` with a gate in the training loop, for tests/test_reliability.py.

Run exactly like the CLI (``python -m tests.gated_train train --config ...``, also under
torchrun). With ``GATE_STEP=S`` and ``GATE_DIR=DIR`` in the environment, each rank listed in
``GATE_RANKS`` (default all) stops before its step S+1, writes ``DIR/rank<R>.json`` (its pid,
step and MLflow run id) and waits until it has recorded a stop signal (SIGTERM/SIGUSR1,
pipeline.train.signals.StopRequest); then the step runs as usual. So a test signals, or
SIGKILLs, a job at a known step instead of racing its progress: a signal recorded at the
gate makes the job stop after step S+1. A rank that waits longer than ``GATE_TIMEOUT_S``
(default 600) exits with code 99, so that a failed test leaves no process behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _install(step: int, ranks: set[int] | None, where: Path, timeout_s: float) -> None:
    from pipeline.train.signals import StopRequest
    from pipeline.train.trainer import Trainer

    signalled: list[int] = []  # a plain flag: a signal handler must not take locks
    handle, train_step = StopRequest._handle, Trainer.train_step

    def _handle(self, signum, frame):
        handle(self, signum, frame)
        signalled.append(signum)

    def gated_step(self, images, labels, **kw):
        if self.step == step and (ranks is None or self.rank in ranks):
            where.mkdir(parents=True, exist_ok=True)
            record = {"pid": os.getpid(), "step": self.step, "run_id": self.tracker.run_id}
            tmp = where / f".rank{self.rank}.tmp"
            tmp.write_text(json.dumps(record))
            tmp.replace(where / f"rank{self.rank}.json")
            deadline = time.monotonic() + timeout_s
            while not signalled:
                if time.monotonic() > deadline:
                    os._exit(99)
                time.sleep(0.05)
        return train_step(self, images, labels, **kw)

    StopRequest._handle = _handle
    Trainer.train_step = gated_step


def main() -> int:
    if "GATE_STEP" in os.environ:
        ranks = os.environ.get("GATE_RANKS")
        _install(
            int(os.environ["GATE_STEP"]),
            None if not ranks else {int(r) for r in ranks.split(",")},
            Path(os.environ["GATE_DIR"]),
            float(os.environ.get("GATE_TIMEOUT_S", "600")),
        )
    from pipeline.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    from pipeline.cli import end, exit_code

    end(exit_code(main))  # as the pipeline command ends a rank
