"""A finished run stays finished: what rerunning ``pipeline train`` on a run folder may change.

A run folder whose ``result.json`` exists holds a finished model. Rerun with the config it
trained with, ``pipeline train`` returns the recorded result and writes nothing. Rerun with
anything that would train more or differently, it refuses in one line
(:class:`FinishedRunError`) naming what changed and the two ways to train on on purpose:

* a new ``train.output_dir`` with ``train.init_weights=RUN/model.safetensors``: a new run whose
  step-0 weights are the finished model's (new optimizer and schedule), any config;
* ``train.continue_finished=true``: the same folder trains on from its final checkpoint to a
  larger ``train.epochs`` or ``sampler.steps_per_epoch`` (nothing else may change: the
  optimizer and schedule state come back from the checkpoint, so a changed learning rate would
  be ignored). The final checkpoint is never pruned (pipeline.train.checkpoint.mark_final),
  the result records ``resumed_from`` and the MLflow run the tag ``continued_from_step``.

An unfinished run resumes with a changed config as it always did (a job requeued with a longer
time limit, a fixed typo), with a warning naming every training key that differs from the
config its checkpoint was trained with.

"What trains" is every config key except those in :data:`NOT_TRAINING` (one place, each
group with its reason). Training data is compared by content: each split's catalog
(``index.parquet`` and ``sizes.json``) has a SHA-256 recorded in the run folder
(``RunDir.data_catalogs``) when it trains, so the same catalog at another location is the same
data, and a catalog rewritten in place is not. The per-rank ``sampler.classes_per_batch`` is
compared as the global batch (P x ranks), which a resume on another number of ranks keeps.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.config.load import flatten
from pipeline.config.runconfig import RunConfig, to_dict
from pipeline.data import catalog, storage
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from pipeline.secrets import redact_tree

log = logging.getLogger(__name__)

# Config keys (flattened: a dataset of data.train is data.train.<i>.<field>) that do not
# change what a run trains, so a finished run may be rerun with other values.
NOT_TRAINING = (
    # Where the run is and how it reports: the folder itself, log and checkpoint cadences,
    # how many checkpoints stay on disk, MLflow, the Slurm resources.
    "train.output_dir",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "tracking.*",
    "launch.*",
    # Time bounds of a job (collective timeouts, the grace after a stop signal): they end a
    # stuck job and never change a step.
    "train.*timeout_s",
    "train.step_timeout_after",
    "train.stop_grace_s",
    # Memory and speed only, the same update by construction: ZeRO partitions the same
    # optimizer step, the gradient cache and the loss's query chunks compute the same sums,
    # the DeepSpeed file may not set any key that changes the math (pipeline.config.deepspeed),
    # threads and processes make the same batches, and object-store access settings.
    "train.zero_stage",
    "train.chunk_size",
    "train.deepspeed_config",
    "loss.query_chunk_size",
    "data.num_workers",
    "data.loader",
    "data.storage.*",
    # Evaluation runs beside training and after it, and feeds no gradient.
    "eval.*",
    "data.eval_urls",
    "data.resize_size",
    "data.allow_crop_mismatch",
    # A dataset's name is shown in messages only; its shards are compared by catalog content
    # (below), and the face crop is read from those catalogs.
    "data.train.*.name",
    "data.train.*.urls",
    "data.crop",
    "data.crop_size",
    # The switch that allows more steps in place (what it allows is checked by itself).
    "train.continue_finished",
)
_URLS = "data.train.*.urls"
# Per-rank P: compared as the global batch (P x ranks), which a resume on another number of
# ranks keeps (pipeline.train.elastic).
_P = "sampler.classes_per_batch"
# What train.continue_finished lets grow.
MORE_STEPS = ("train.epochs", "sampler.steps_per_epoch")
_SHOWN = 5  # differing keys named in a message


class FinishedRunError(UserError, RuntimeError):
    """A finished run was asked to train more or differently in place."""


@dataclass(frozen=True)
class Change:
    """One training key whose value differs from the run's recorded config."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    return repr(value) if value == "" else str(value)


def catalog_digest(spec: str) -> str | None:
    """SHA-256 of a split's catalog (``index.parquet`` then ``sizes.json``) and of the names of
    the shards ``spec`` selects from it (a pattern may take some of a split's shards), local or
    ``s3://``; None when ``spec`` names no readable catalog (remote shards outside a split, a
    folder not written by make-shards, a location that is gone)."""
    try:
        folder = catalog.split_dir(spec)
        digest = hashlib.sha256()
        for name in (catalog.INDEX_FILE, catalog.SIZES_FILE):
            digest.update(storage.read_bytes(storage.join(folder, name)))
        shards = [storage.basename(url) for url in catalog.expand_urls(spec)]
    except (OSError, ValueError, UserError):
        return None
    digest.update("\n".join(shards).encode())
    return digest.hexdigest()


def _digest(spec: str, digests: dict[str, str | None] | None) -> str | None:
    """:func:`catalog_digest` of ``spec``, read once per ``digests`` (one decision's reads: a
    catalog may be large and remote)."""
    if digests is None:
        return catalog_digest(spec)
    if spec not in digests:
        digests[spec] = catalog_digest(spec)
    return digests[spec]


def record_catalogs(
    run_dir: RunDir, cfg: RunConfig, digests: dict[str, str | None] | None = None
) -> None:
    """Add the digest of each training split's catalog to the run folder's record (rank 0,
    when a job is about to train: the data it trains on); ``digests``: those already read
    for this decision (:func:`training_changes`)."""
    known = _recorded(run_dir)
    for source in cfg.data.train:
        digest = _digest(source.urls, digests)
        if digest is not None:
            known[source.urls] = digest
    run_dir.data_catalogs.parent.mkdir(parents=True, exist_ok=True)
    run_dir.data_catalogs.write_text(json.dumps(known, indent=1, sort_keys=True))


def _recorded(run_dir: RunDir) -> dict[str, str]:
    path = run_dir.data_catalogs
    return json.loads(path.read_text()) if path.is_file() else {}


def _excluded(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in NOT_TRAINING)


def _data_change(
    key: str, old: Any, new: Any, recorded: dict[str, str], digests: dict[str, str | None] | None
) -> Change | None:
    """A training split compared by its catalog's content (by location when it has none)."""
    if old is None or new is None:
        return Change(key, old, new)
    before = recorded.get(old) or _digest(old, digests)
    after = _digest(new, digests)
    if before is None or after is None:
        return None if old == new else Change(key, old, new)
    if before == after:
        return None
    return Change(key, f"{old} (catalog {before[:12]})", f"{new} (catalog {after[:12]})")


def training_changes(
    run_dir: RunDir,
    cfg: RunConfig,
    *,
    world: int,
    saved_world: int,
    digests: dict[str, str | None] | None = None,
) -> list[Change]:
    """The training keys of ``cfg`` (adapted to ``world`` ranks: ``RunPlan.apply``) whose
    values differ from the config the run folder last trained with (on ``saved_world``
    ranks); [] when it records none. ``digests`` keeps the catalog digests read, for
    :func:`record_catalogs` to reuse."""
    if not run_dir.config.is_file():
        return []
    saved = yaml.safe_load(run_dir.config.read_text()) or {}
    # A key added since the run trained takes its default, which is what the run trained with.
    old = {**flatten(to_dict(RunConfig())), **flatten(saved)}
    new = flatten(redact_tree(to_dict(cfg)))
    recorded = _recorded(run_dir)
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if fnmatch.fnmatchcase(key, _URLS):
            change = _data_change(key, before, after, recorded, digests)
        elif key == _P:
            before, after = before * saved_world, after * world
            change = Change(f"{_P} x ranks", before, after) if before != after else None
        elif _excluded(key) or before == after:
            change = None
        else:
            change = Change(key, before, after)
        if change is not None:
            changes.append(change)
    return changes


def _listed(changes: list[Change]) -> str:
    shown = "; ".join(map(str, changes[:_SHOWN]))
    more = len(changes) - _SHOWN
    return shown + (f"; and {more} more" if more > 0 else "")


def check_finished(
    run_dir: RunDir, cfg: RunConfig, changes: list[Change], tag: str | None
) -> int | None:
    """For a finished run rerun with ``changes``: None when there are none (the recorded
    result stands), the step it continues from (checkpoint ``tag``) when
    ``train.continue_finished`` allows them, else a :class:`FinishedRunError` saying how to
    train on on purpose."""
    if not changes:
        return None
    result = run_dir.read_result() or {}
    step = int(result.get("step", 0))
    total = cfg.train.epochs * cfg.sampler.steps_per_epoch
    more_steps_only = all(c.key in MORE_STEPS for c in changes) and total > step
    if cfg.train.continue_finished and more_steps_only and tag is None:
        raise FinishedRunError(
            f"train.continue_finished=true: {run_dir.checkpoints} holds no checkpoint to "
            f"continue the finished run from; train into a new train.output_dir with "
            f"train.init_weights={run_dir.weights}"
        )
    if cfg.train.continue_finished and more_steps_only:
        log.warning(
            "%s: continuing the run that finished at step %d to step %d "
            "(train.continue_finished=true; %s); its final checkpoint is kept",
            *(run_dir.root, step, total, _listed(changes)),
        )
        return step
    weights = run_dir.weights if run_dir.weights.is_file() else run_dir.checkpoints
    why = (
        "train.continue_finished=true allows only more steps (a larger train.epochs or "
        "sampler.steps_per_epoch) and is set, but this config changes more; "
        if cfg.train.continue_finished
        else "for more steps in place (only train.epochs or sampler.steps_per_epoch larger), "
        "set train.continue_finished=true; "
    )
    raise FinishedRunError(
        f"train.output_dir={str(run_dir.root)!r} holds a finished run (result.json, step "
        f"{step}) and this config would train it more or differently: {_listed(changes)}; a "
        f"finished run is never retrained in place: {why}to train from its model with any "
        f"config, use a new train.output_dir with train.init_weights={weights}"
    )


def warn_resumed(run_dir: RunDir, tag: str, changes: list[Change]) -> None:
    """An unfinished run resumes from checkpoint ``tag`` with ``changes``: say which keys
    differ and that the optimizer and schedule state come from the checkpoint."""
    if not changes:
        return
    log.warning(
        "resuming %s from %s with a config that differs from the one it was trained with: %s. "
        "The run goes on with the new config, but the optimizer's and the schedule's state "
        "(learning rates, weight decay, step count) come from the checkpoint; to train with "
        "new settings from its weights, use a new train.output_dir with "
        "train.init_weights=%s",
        *(run_dir.root, tag, _listed(changes), run_dir.checkpoints),
    )
