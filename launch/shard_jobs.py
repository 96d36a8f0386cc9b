"""What runs inside a make-shards array element or merge job (submitted by ``launch.shards``).

Kept apart from the submitting module, which imports the whole launcher (training and
evaluation jobs, MLflow, torch): a job unpickles its callable by importing its module, and a
make-shards part needs none of that (it cost each element tens of seconds on a loaded machine).
"""

from __future__ import annotations

import shlex

import submitit

from pipeline.cli import main as pipeline_main


class MakeShardsTask(submitit.helpers.Checkpointable):
    """One job: ``pipeline make-shards ARGV`` in this process; a non-zero exit fails the job
    (the command's one-line error is in the job's log). Requeued from the start on preemption:
    a part replaces whatever an earlier attempt left."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def __call__(self) -> int:
        code = pipeline_main(["make-shards", *self.argv])
        if code:
            raise RuntimeError(
                f"pipeline make-shards {shlex.join(self.argv)} exited with {code} (its error is "
                "printed above)"
            )
        return code
