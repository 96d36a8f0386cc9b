"""A new run that starts from trained weights (``train.init_weights``) instead of random ones.

How a finished run trains on under another config: a new ``train.output_dir`` whose step-0
model is the finished one's, every tensor (BatchNorm statistics included), with a new optimizer
and schedule. A checkpoint in the new folder, once there is one, takes precedence (a resumed
job continues where it was, not from these weights again).
"""

from __future__ import annotations

import logging

import torch

from pipeline.model import EmbeddingModel
from pipeline.weights import ModelLoadError, check_finite, read_trained_weights

log = logging.getLogger(__name__)


def load_init_weights(model: EmbeddingModel, path: str) -> None:
    """Copy every tensor of the weights ``path`` (a run's model.safetensors, or a checkpoint
    root or tag) into ``model``; nothing when ``path`` is ''. A file of another architecture
    or with other tensors is a :class:`ModelLoadError` naming it."""
    if not path:
        return
    where = f"train.init_weights={path!r}"
    state, arch, _, origin = read_trained_weights(path)
    log.info("initialising from %s", origin.describe())
    own = model.state_dict()
    mine = model.architecture
    if arch is not None and any(arch.get(k, v) != v for k, v in mine.items()):
        raise ModelLoadError(
            f"{where} holds a model with {arch}, but the config builds {mine}; set the model.* "
            "keys of the run that wrote it, or name weights of this model"
        )
    check_finite(state, where)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ModelLoadError(
            f"{where} does not fit the configured model: {len(missing)} tensors missing (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(bad)} of another shape (e.g. {bad[:3]}); name weights of this model"
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
