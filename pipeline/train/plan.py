"""The decisions a training run makes before any engine starts: :func:`plan_run` -> RunPlan.

Rank 0 decides (the run directory, the shards, the checkpoints and the tracking store can
reveal most mistakes in seconds) and every rank receives the same frozen :class:`RunPlan`:
which checkpoint to resume from, how many classes each rank's batch holds (a resume on another
number of ranks keeps the checkpoint's global batch, pipeline.train.elastic), and whether the
run has already finished. A finished run rerun with a config that would train it more or
differently is refused here, before any engine starts (pipeline.train.finished). The run lock
(pipeline.train.runlock) is held around it by the entry point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config.runconfig import RunConfig
from pipeline.distributed import collectives
from pipeline.eval.protocols import preflight  # the shard checks, then the protocol's
from pipeline.rundir import RunDir
from pipeline.tracking.mlflow import MlflowTracker
from pipeline.train import checkpoint, elastic, finished
from pipeline.weights import ModelLoadError

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
    """The run directory holds a result of this config: nothing to train."""
    continued_from: int | None = None
    """The step at which the run had finished, when ``train.continue_finished`` trains it on."""

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
    saved_batch, saved_world = None, world
    if tag is not None:
        layout = elastic.saved_layout(root / tag)
        saved_batch = layout.world_size * layout.batch_size_per_gpu
        saved_world = layout.world_size
        if layout.world_size != world:
            per_rank = elastic.classes_per_batch_for(
                layout.world_size, layout.classes_per_batch(k), world
            )
    planned = replace(cfg, sampler=replace(cfg.sampler, classes_per_batch=per_rank))
    digests: dict[str, str | None] = {}  # each training catalog read once for this plan
    changes = finished.training_changes(
        run_dir, planned, world=world, saved_world=saved_world, digests=digests
    )
    done = run_dir.result.is_file()
    continued_from = None
    if done:
        continued_from = finished.check_finished(run_dir, planned, changes, tag)
        done = continued_from is None
    elif tag is not None:
        finished.warn_resumed(run_dir, tag, changes)
    if not done:  # a finished run needs no data
        _check_init_weights(cfg)
        report = preflight(planned, world, global_batch=saved_batch)
        log.info("preflight passed in %.2f s", report.seconds)
        finished.record_catalogs(run_dir, planned, digests)
    if cfg.tracking.enabled:
        MlflowTracker.check(cfg.tracking)
    return RunPlan(
        world_size=world,
        resume_tag=tag,
        classes_per_batch=per_rank,
        global_batch=per_rank * k * world,
        finished=done,
        continued_from=continued_from,
    )


def _check_init_weights(cfg: RunConfig) -> None:
    path = cfg.train.init_weights
    if path and not Path(path).exists():
        raise ModelLoadError(
            f"train.init_weights={path!r} does not exist; name a run's model.safetensors or "
            "its checkpoints/ directory, or set train.init_weights='' to start from train.seed"
        )
