"""Collective DeepSpeed checkpoints: periodic, last-N kept, loaded without arbitrary unpickling.

Layout under ``<train.output_dir>/checkpoints``::

    step_00000012/         one DeepSpeed tag per save (model states + ZeRO optimizer partitions)
    step_00000018/
    latest                 the tag to resume from, replaced atomically once every rank has saved

DeepSpeed's own ``latest`` file is written by rank 0 while other ranks may still be writing
their optimizer partitions; a kill at that moment would point ``latest`` at a half-written
checkpoint. Here ``latest`` is written only after the collective save has returned on every
rank (its final barrier), with a rename, so it always names a complete checkpoint.

Loading: DeepSpeed reads its files with ``torch.load(weights_only=False)``, which runs
arbitrary pickled code. :class:`SafeTorchCheckpointEngine` replaces that with
``weights_only=True`` plus exactly three DeepSpeed classes that ZeRO optimizer files contain
(``LossScaler``, a plain record of the loss scale; ``fragment_address``, a dataclass of two
ints; ``ZeroStageEnum``, an int enum); anything else in a file is refused.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed

LATEST = "latest"
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message names it and the fix."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _safe_globals() -> list:
    # The only non-container objects in DeepSpeed 0.19 checkpoints (ZeRO 1/2 optimizer
    # partitions); tests/test_checkpoint.py checks that a file with anything else is refused.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True`` and only DeepSpeed's three record classes."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


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


def latest_tag(root: str | Path) -> str | None:
    """The tag ``latest`` names, or None when nothing was saved yet."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (Path(root) / tag).is_dir():
        raise CheckpointError(
            f"{path} names checkpoint {tag!r}, which does not exist under {root}; restore "
            f"it, or point {path} at one of {sorted(p.name for p in Path(root).glob('step_*'))}"
        )
    return tag


def _write_latest(root: Path, tag: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)


def prune(root: str | Path, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest step tags (never the one ``latest`` names)."""
    root = Path(root)
    keep_tag = latest_tag(root)
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name))
    doomed = [t for t in tags[: max(len(tags) - keep, 0)] if t != keep_tag]
    for t in doomed:
        shutil.rmtree(root / t, ignore_errors=True)
    return doomed


def save(engine: Any, root: str | Path, step: int, client_state: dict, keep: int) -> str:
    """Save a checkpoint of ``engine`` at ``step``. All ranks participate."""
    root = Path(root)
    tag = tag_for(step)
    # All ranks participate: DeepSpeed's save is collective and ends with a barrier, so
    # after it every rank's files are on disk.
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if distributed.is_main_process():
        _write_latest(root, tag)
        prune(root, keep)
    # All ranks participate: nobody resumes or saves again before 'latest' is in place.
    distributed.barrier()
    return tag


def check_architecture(root: str | Path, tag: str, expected: dict) -> None:
    """Refuse a checkpoint whose recorded model architecture differs from ``expected``."""
    from pipeline.model import DS_MODEL_STATES

    file = Path(root) / tag / DS_MODEL_STATES
    # mmap: only the small client-state entries are actually read.
    states = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    found = states.get("architecture")
    if found is not None and found != expected:
        raise CheckpointError(
            f"checkpoint {file} holds a model with {found}, but the config builds {expected}; "
            "resume with the model settings it was trained with, or start a new "
            "train.output_dir"
        )


def load_latest(engine: Any, root: str | Path, architecture: dict | None = None) -> dict | None:
    """Restore ``engine`` (weights, optimizer, scheduler) from the latest checkpoint under
    ``root`` and return its client state, or None when there is none. All ranks participate.

    ``architecture``: what the checkpoint's recorded model must be (else CheckpointError).
    """
    root = Path(root)
    tag = latest_tag(root)
    if tag is None:
        return None
    if architecture is not None:
        check_architecture(root, tag, architecture)
    try:
        # All ranks participate (ZeRO partitions are read by their owners).
        path, client_state = engine.load_checkpoint(str(root), tag=tag)
    except Exception as e:
        raise CheckpointError(
            f"cannot resume from {root / tag}: {type(e).__name__}: {e}. A checkpoint resumes "
            "with the same model, ZeRO stage and (for ZeRO 1/2) the same number of ranks; "
            "start a new train.output_dir to train from scratch"
        ) from e
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {root / tag}")
    return client_state
