"""The decisions a training run makes before any engine starts: :func:`plan_run` -> RunPlan.

Rank 0 decides (the run directory, the shards, the checkpoints and the tracking store can
reveal most mistakes in seconds) and every rank receives the same frozen :class:`RunPlan`:
which checkpoint to resume from, how many classes each rank's batch holds (a resume on another
number of ranks keeps the checkpoint's global batch, pipeline.train.elastic), and whether the
run has already finished. The run lock (pipeline.train.runlock) is held around it by the entry
point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from pipeline.config.runconfig import RunConfig
from pipeline.distributed import collectives
from pipeline.eval.protocols import preflight  # the shard checks, then the protocol's
from pipeline.rundir import RunDir
from pipeline.tracking.mlflow import MlflowTracker
from pipeline.train import checkpoint, elastic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """What every rank of a run agrees on before it builds anything."""

    world_size: int
    """Ranks of this job."""
    resume_tag: str | None
    """The checkpoint to resume from (the newest complete one), or None to start."""
    classes_per_batch: int
    """P of each rank's P x K batch: the config's, or the one that keeps a checkpoint's
    global batch on another number of ranks."""
    global_batch: int
    """Images per optimizer step over all ranks."""
    finished: bool
    """The run directory holds a result: nothing to train."""

    def apply(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with this plan's P per rank (logged when it differs from the config's)."""
        if self.classes_per_batch == cfg.sampler.classes_per_batch:
            return cfg
        log.warning(
            "resuming %s on %d ranks: sampler.classes_per_batch %d -> %d keeps the "
            "checkpoint's global batch; the rest of the interrupted epoch is drawn in "
            "another order than on the old number of ranks",
            *(self.resume_tag, self.world_size, cfg.sampler.classes_per_batch),
            self.classes_per_batch,
        )
        return replace(cfg, sampler=replace(cfg.sampler, classes_per_batch=self.classes_per_batch))


def plan_run(cfg: RunConfig, world: int) -> RunPlan:
    """Decide on rank 0 and share: all ranks participate (one broadcast); an error on rank 0
    (a bad shard, an unreachable tracking store) is raised on every rank."""
    return collectives.on_main(lambda: _decide(cfg, world))


def _decide(cfg: RunConfig, world: int) -> RunPlan:
    run_dir = RunDir.of(cfg)
    root = run_dir.checkpoints
    tag = checkpoint.resumable_tag(root)
    per_rank = cfg.sampler.classes_per_batch
    k = cfg.sampler.samples_per_class
    saved_batch = None
    if tag is not None:
        layout = elastic.saved_layout(root / tag)
        saved_batch = layout.world_size * layout.batch_size_per_gpu
        if layout.world_size != world:
            per_rank = elastic.classes_per_batch_for(
                layout.world_size, layout.classes_per_batch(k), world
            )
    finished = run_dir.result.is_file()
    planned = replace(cfg, sampler=replace(cfg.sampler, classes_per_batch=per_rank))
    if not finished:  # a finished run needs no data
        report = preflight(planned, world, global_batch=saved_batch)
        log.info("preflight passed in %.2f s", report.seconds)
    if cfg.tracking.enabled:
        MlflowTracker.check(cfg.tracking)
    return RunPlan(
        world_size=world,
        resume_tag=tag,
        classes_per_batch=per_rank,
        global_batch=per_rank * k * world,
        finished=finished,
    )
