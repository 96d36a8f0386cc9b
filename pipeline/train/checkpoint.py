"""Collective DeepSpeed checkpoints: periodic, last-N kept, loaded without arbitrary unpickling.

Layout under ``<train.output_dir>/checkpoints``::

    step_00000012/         one DeepSpeed tag per save (model states + ZeRO optimizer partitions)
    step_00000018/
    latest                 the tag to resume from, replaced atomically once every rank has saved
    final                  the tags at which the run finished, one a line: never pruned

DeepSpeed's own ``latest`` file is written by rank 0 while other ranks may still be writing
their optimizer partitions; a kill at that moment would point ``latest`` at a half-written
checkpoint. Here ``latest`` is written only after the collective save has returned on every
rank (its final barrier), with a rename, so it always names a complete checkpoint.

Completeness: the last act of a save is ``manifest.json`` in the tag's folder (every file,
its size and SHA-256; pipeline.train.manifest), written before ``latest`` moves. A resume uses
the newest checkpoint whose manifest verifies, ``latest``'s when it is intact, and names every
damaged or unfinished one it passes over. Before a save, rank 0 compares the free space with
the size of the previous checkpoint; a full disk is reported as such, naming the folder and
the space needed, and ``latest`` keeps naming the previous checkpoint.

Finished models: the checkpoint of each step at which the run finished (its result.json was
written from it) is listed in ``final`` and never pruned, whatever ``train.keep_checkpoints``
says: a run continued on purpose (``train.continue_finished``) keeps the model it had finished
with, resumable and loadable as ``--weights RUN/checkpoints/<tag>``.

World size: a checkpoint resumes on another number of ranks (pipeline.train.elastic).

Loss state: a loss that keeps state across steps (pipeline.loss.LossState) has it saved in the
tag's folder beside DeepSpeed's files, before the manifest: ``loss_state.pt`` once (rank 0's)
when the loss declares it global, else ``loss_state_rank<R>.pt`` per rank, which resumes on the
same number of ranks only. A checkpoint without such files (every one written before losses
could keep state) resumes a stateless loss unchanged.

Run state: :class:`TrainState` (step, data position, seeds, world size, architecture, MLflow
run id) travels as DeepSpeed's client state, i.e. as top-level entries of the model states
file, and carries a version; :func:`resume` checks the version and the architecture before
DeepSpeed reads anything.

Loading: DeepSpeed reads its files with ``torch.load(weights_only=False)``, which runs
arbitrary pickled code. :class:`SafeTorchCheckpointEngine` replaces that with
:func:`pipeline.train.safe_load.safe_load` (``weights_only=True`` plus exactly the three record
classes ZeRO optimizer files contain); anything else in a file is refused.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.distributed import collectives, group
from pipeline.loss import LossState
from pipeline.train import elastic, manifest
from pipeline.train.safe_load import safe_load
from pipeline.weights import LATEST, MODEL_STATES, CheckpointError, latest_tag, read_client_state

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step_(\d{8})$")
# A loss's state in a tag's folder (pipeline.loss.LossState): once, or one file per rank.
LOSS_STATE = "loss_state.pt"
_LOSS_STATE_RANKS = "loss_state_rank*.pt"


def loss_state_file(rank: int) -> str:
    return f"loss_state_rank{rank:05d}.pt"


TRAIN_STATE_VERSION = 2
# Version 1: the same entries as an untyped dict (before TrainState); it reads unchanged.
_READABLE_VERSIONS = (1, TRAIN_STATE_VERSION)


@dataclass(frozen=True)
class TrainState:
    """What a checkpoint records about the run besides weights, optimizer and schedule."""

    step: int
    """Optimizer steps done."""
    epoch: int
    """Epoch of the next step (``step // sampler.steps_per_epoch``)."""
    step_in_epoch: int
    """Position in that epoch: the data stream restarts there."""
    sampler_seed: int
    """``sampler.seed``: with epoch, rank and world size it fixes the batches."""
    train_seed: int
    """``train.seed``: torch's generators are reseeded from (seed, rank, step) every step."""
    world_size: int
    """Ranks that trained: another count changes the data stream (reported on resume)."""
    architecture: dict[str, Any] = field(default_factory=dict)
    """``EmbeddingModel.architecture``: a checkpoint of another model is refused."""
    mlflow_run_id: str = ""
    """The MLflow run a resumed job continues ('' when tracking was off)."""
    version: int = TRAIN_STATE_VERSION

    def to_client_state(self) -> dict[str, Any]:
        """Plain entries for DeepSpeed's ``client_state`` (weights-only loadable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_client_state(cls, state: dict[str, Any], where: str | Path) -> TrainState:
        """Read the entries back; an unknown version or a missing entry is a CheckpointError
        naming ``where`` (the checkpoint file)."""
        version = state.get("version")
        if version not in _READABLE_VERSIONS:
            raise CheckpointError(
                f"{where}: train state version {version!r} is not one this code reads "
                f"({', '.join(map(str, _READABLE_VERSIONS))}); resume it with the pipeline "
                "version that wrote it, or train into a new train.output_dir"
            )
        names = [f.name for f in dataclasses.fields(cls) if f.name != "version"]
        missing = [n for n in names if n not in state]
        if missing:
            raise CheckpointError(
                f"{where}: the train state lacks {missing}; the checkpoint was not written by "
                "`pipeline train`: train into a new train.output_dir"
            )
        values = {n: state[n] for n in names}
        return cls(**values, version=TRAIN_STATE_VERSION)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _safe_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with :func:`safe_load`."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location=map_location)

    return SafeTorchCheckpointEngine


def install_safe_loading(engine: Any) -> None:
    """Make ``engine`` read its checkpoints with :func:`safe_load`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(
            f"DeepSpeed chose the {type(current).__name__} checkpoint engine; this pipeline "
            "only knows how to load torch checkpoints safely: remove 'checkpoint' settings "
            "(nebula, decoupled, fast writer) from the DeepSpeed config"
        )
    safe = _safe_engine_class()(config_params=engine._config)
    safe.zipfile_serialization = current.zipfile_serialization
    engine.checkpoint_engine = safe


def _write_latest(root: Path, tag: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)


FINAL = "final"


def final_tags(root: str | Path) -> list[str]:
    """The tags at which the run under ``root`` finished (oldest first; [] when none)."""
    path = Path(root) / FINAL
    return path.read_text().split() if path.is_file() else []


def mark_final(root: str | Path, step: int) -> None:
    """Record the checkpoint of ``step`` as a finished model's, so that :func:`prune` keeps
    it. Rank 0 writes (a file; no collective); the other ranks return."""
    root, tag = Path(root), tag_for(step)
    if not group.is_main_process() or tag in final_tags(root):
        return
    if not (root / tag).is_dir():
        # A warning, not an error: rank 0 alone raising would leave the other ranks waiting
        # in the final evaluation's collectives.
        log.warning("%s does not exist: the run finished at step %d without it", root / tag, step)
        return
    tmp = root / f".{FINAL}.tmp"
    tmp.write_text("".join(f"{t}\n" for t in [*final_tags(root), tag]))
    os.replace(tmp, root / FINAL)


def prune(root: str | Path, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest step tags (never the one ``latest`` names, nor a
    finished model's: :func:`mark_final`)."""
    root = Path(root)
    # A finished model's checkpoint is outside the rotation: neither pruned nor counted.
    latest, final = latest_tag(root), set(final_tags(root))
    tags = sorted(
        p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and p.name not in final
    )
    doomed = [t for t in tags[: max(len(tags) - keep, 0)] if t != latest]
    for t in doomed:
        shutil.rmtree(root / t, ignore_errors=True)
    return doomed


def _bytes_needed(engine: Any, root: Path) -> int:
    """What the next save will write: the size of the newest complete checkpoint, else an
    estimate from the weights (model states plus two optimizer moments per parameter)."""
    for tag in _tags_newest_first(root):
        size = manifest.total_bytes(root / tag)
        if size:
            return size
    n = sum(p.numel() for p in engine.module.parameters())
    return 4 * n * 4  # fp32 weights, fp32 masters, two fp32 Adam moments


def _check_space(engine: Any, root: Path, tag: str) -> None:
    """Refuse a save that the disk cannot hold, before anything is written (rank 0 looks;
    all ranks learn the answer: a rank failing alone inside DeepSpeed's save would leave the
    others waiting in its barrier)."""

    def look() -> str:
        root.mkdir(parents=True, exist_ok=True)
        need, free = _bytes_needed(engine, root), shutil.disk_usage(root).free
        if free < need * 1.05:
            return _disk_full_message(root, tag, need, free)
        return ""

    # All ranks participate (one broadcast).
    message = collectives.on_main(look)
    if message:
        raise CheckpointError(message)


def _disk_full_message(root: Path, tag: str, need: int, free: int) -> str:
    latest = latest_tag(root) if (root / LATEST).is_file() else None
    kept = f"'latest' still names {latest}" if latest else "no earlier checkpoint exists"
    return (
        f"checkpoint {tag} cannot be written under {root}: the disk is full (free "
        f"{free / 2**20:.0f} MiB, this checkpoint needs about {need / 2**20:.0f} MiB); free "
        f"space there (or lower train.keep_checkpoints), or train into a train.output_dir on "
        f"another disk; {kept}, from which the run resumes"
    )


def _save_loss_state(folder: Path, loss: LossState | None) -> None:
    """Each rank's part of the loss state (rank 0 alone for a global one); before DeepSpeed's
    save, whose final barrier then covers these files too."""
    if loss is None or (loss.global_state and not group.is_main_process()):
        return
    name = LOSS_STATE if loss.global_state else loss_state_file(group.get_rank())
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(loss.state_dict(), folder / name)


def save(
    engine: Any,
    root: str | Path,
    step: int,
    client_state: dict,
    keep: int,
    loss_state: LossState | None = None,
) -> str:
    """Save a checkpoint of ``engine`` (and ``loss_state``) at ``step`` (manifest last, then
    ``latest``). All ranks participate."""
    root = Path(root)
    tag = tag_for(step)
    # All ranks participate.
    _check_space(engine, root, tag)
    _save_loss_state(root / tag, loss_state)
    try:
        # All ranks participate: DeepSpeed's save is collective and ends with a barrier, so
        # after it every rank's files are on disk.
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports ENOSPC as "unexpected pos ..." or "file write failed".
        text = str(e)
        full = getattr(e, "errno", None) == errno.ENOSPC or any(
            m in text for m in ("unexpected pos", "file write failed", "No space left")
        )
        if full:
            need, free = _bytes_needed(engine, root), shutil.disk_usage(root).free
            if free < need:
                raise CheckpointError(_disk_full_message(root, tag, need, free)) from e
        raise
    if group.is_main_process():
        # The manifest is the save's last act: a folder without one was never finished.
        manifest.write(root / tag, {"step": step})
        _write_latest(root, tag)
        prune(root, keep)
    # All ranks participate: nobody resumes or saves again before 'latest' is in place.
    collectives.barrier()
    return tag


def _tags_newest_first(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(
        (p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)), reverse=True
    )


def resumable_tag(root: str | Path) -> str | None:
    """The checkpoint to resume from: ``latest``'s tag when its manifest verifies (sizes and
    SHA-256), else the newest older tag that does, with a warning naming each damaged or
    unfinished one passed over; None when nothing was saved. Reads every byte of the chosen
    checkpoint once: call it on one rank (the trainer's rank 0)."""
    root = Path(root)
    try:
        latest = latest_tag(root)
    except CheckpointError as e:
        log.warning("%s", e)
        latest = None
    candidates = _tags_newest_first(root)
    if latest is None and not candidates:
        return None
    if latest in candidates:  # latest first, then the others newest first
        candidates.remove(latest)
        candidates.insert(0, latest)
    damaged = []
    for tag in candidates:
        problem = manifest.verify(root / tag)
        if problem is None:
            if damaged:
                log.warning(
                    "resuming from %s: passed over %s",
                    root / tag,
                    "; ".join(f"{root / t} ({why})" for t, why in damaged),
                )
            return tag
        damaged.append((tag, problem))
    if not damaged:
        return None
    raise CheckpointError(
        f"no complete checkpoint under {root}: "
        + "; ".join(f"{t}: {why}" for t, why in damaged)
        + "; restore one from a copy, or move the folder away to train from scratch"
    )


def check_architecture(found: dict | None, expected: dict, where: str | Path) -> None:
    """Refuse a checkpoint whose recorded model architecture differs from ``expected``."""
    if found is not None and found != expected:
        raise CheckpointError(
            f"checkpoint {where} holds a model with {found}, but the config builds {expected}; "
            "resume with the model settings it was trained with, or start a new "
            "train.output_dir"
        )


def load_tag(engine: Any, root: str | Path, tag: str) -> dict:
    """Restore ``engine`` (weights, optimizer, scheduler) from ``root/tag``, written by any
    number of ranks (pipeline.train.elastic), and return its client state. All ranks
    participate."""
    root = Path(root)
    try:
        # All ranks participate (ZeRO partitions are read by their owners).
        return elastic.load(engine, root, tag)
    except elastic.ElasticResumeError as e:
        raise CheckpointError(str(e)) from e
    except Exception as e:
        raise CheckpointError(
            f"cannot resume from {root / tag}: {type(e).__name__}: {e}. A checkpoint resumes "
            "with the same model and ZeRO stage; start a new train.output_dir to train from "
            "scratch"
        ) from e


def _loss_state_to_load(folder: Path, loss: LossState | None, saved_world: int) -> Path | None:
    """The file this rank restores ``loss``'s state from (None: nothing to restore), or a
    CheckpointError when the checkpoint and the loss disagree."""
    found = sorted(p.name for p in folder.glob(_LOSS_STATE_RANKS))
    found += [LOSS_STATE] if (folder / LOSS_STATE).is_file() else []
    if loss is None:
        if found:
            raise CheckpointError(
                f"{folder} holds a loss state ({found[0]}) but the configured loss keeps none; "
                "resume with the loss settings it was trained with, or train into a new "
                "train.output_dir"
            )
        return None
    name, world = type(loss).__name__, group.get_world_size()
    if not loss.global_state and saved_world != world:
        raise CheckpointError(
            f"{folder}: the loss {name} keeps a state per rank, saved by {saved_world} ranks, "
            f"which does not resume on {world} ranks; resume on {saved_world} ranks, or train "
            "into a new train.output_dir"
        )
    file = folder / (LOSS_STATE if loss.global_state else loss_state_file(group.get_rank()))
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing: the checkpoint holds no state for the loss {name} (found "
            f"{found or 'none'}); resume with the loss settings it was trained with, or train "
            "into a new train.output_dir"
        )
    return file


def resume(
    engine: Any,
    root: str | Path,
    architecture: dict,
    tag: str | None = None,
    loss_state: LossState | None = None,
) -> TrainState | None:
    """Restore ``engine`` (and ``loss_state``) from checkpoint ``tag`` under ``root``
    (default: the tag ``latest`` names) and return its :class:`TrainState`, or None when
    there is none. The state's version, the architecture and the loss state's files are
    checked before DeepSpeed reads anything. All ranks participate."""
    root = Path(root)
    tag = tag or latest_tag(root)
    if tag is None:
        return None
    file = root / tag / MODEL_STATES
    state = TrainState.from_client_state(read_client_state(file), file)
    check_architecture(state.architecture, architecture, file)
    loss_file = _loss_state_to_load(root / tag, loss_state, state.world_size)
    # All ranks participate.
    load_tag(engine, root, tag)
    if loss_state is not None and loss_file is not None:
        loss_state.load_state_dict(safe_load(loss_file, map_location="cpu"))
    return state


def save_state(
    engine: Any,
    root: str | Path,
    state: TrainState,
    keep: int,
    loss_state: LossState | None = None,
) -> str:
    """:func:`save` with ``state`` as the client state. All ranks participate."""
    return save(engine, root, state.step, state.to_client_state(), keep, loss_state)
