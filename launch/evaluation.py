"""Large evaluations as a Slurm array job plus a dependent merge job (one job would embed a
million-image gallery alone for hours).

The work is the library's (:mod:`pipeline.eval.parts`: planning, part files, fingerprints,
merge and scoring); this module only wraps it in submitit jobs. Array task i embeds shard
range i of the plan; the merge job, started by Slurm only when every array task succeeded
(``afterok``), merges the parts and logs one evaluation run. Both are requeueable: a part
already written from the same weights and shards is not recomputed.
"""

from __future__ import annotations

from typing import Any

import submitit

from launch.jobs import export_distributed_env, guard_requeue_signal
from pipeline import logs
from pipeline.config.runconfig import RunConfig
from pipeline.distributed import group
from pipeline.eval.parts import extract_part, merge_and_score
from pipeline.rundir import EvalDir


def _start(cfg: RunConfig) -> None:
    """What every evaluation task does first: rank environment, then rank-aware logging."""
    guard_requeue_signal()
    export_distributed_env()

    rank = group.process_rank()
    logs.setup_logging(EvalDir.of(cfg).log_file(rank), rank=rank)


class ExtractPartJob(submitit.helpers.Checkpointable):
    """Array task: embed the shards ``urls`` and write part ``part`` (rank 0 writes)."""

    def __init__(self, cfg: RunConfig, checkpoint: str, part: int, urls: list[str]) -> None:
        self.cfg, self.checkpoint, self.part, self.urls = cfg, checkpoint, part, urls

    def __call__(self) -> dict[str, Any]:
        _start(self.cfg)

        return extract_part(self.cfg, self.checkpoint, self.part, self.urls)


class MergeEvalJob(submitit.helpers.Checkpointable):
    """Dependent job: merge the parts, compute and write the metrics, log them to MLflow."""

    def __init__(self, cfg: RunConfig, checkpoint: str, plan: list[list[str]]) -> None:
        self.cfg, self.checkpoint, self.plan = cfg, checkpoint, plan
        self.parts = len(plan)

    def __call__(self) -> dict[str, Any]:
        """Returns ``metrics``, ``run_id`` (MLflow; None off rank 0) and ``output_dir``."""
        _start(self.cfg)

        return merge_and_score(self.cfg, self.checkpoint, self.plan)
