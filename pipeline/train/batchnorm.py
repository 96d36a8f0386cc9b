"""The BatchNorm policy of a training run: frozen, synchronised, or broadcast from rank 0.

Every rank must hold one model at every step (the metrics a run reports are those of the
weights it saves, and a resumed run equals an uninterrupted one). BatchNorm is the one part of
the network whose state the optimizer does not keep in step, so a run picks one of:

* ``frozen`` (``model.freeze_bn=true``, Smooth-AP's recipe): running statistics and affine
  parameters stay fixed; the layers stay in eval mode (:class:`pipeline.model.EmbeddingModel`
  keeps them there, also for evaluation and export). The gradient cache's chunked
  re-forward then computes exactly the full batch's embeddings.
* ``sync`` (``model.sync_bn=true``, several ranks, CUDA): SyncBatchNorm normalises over the
  global batch, so every rank computes the same statistics.
* ``broadcast`` (trainable BatchNorm otherwise): each rank normalises with its own batch and
  rank 0's running statistics are broadcast after every step and after a resume (a checkpoint
  holds rank 0's statistics only), as torch's DDP does by default; DeepSpeed does not.
* ``none``: the network has no BatchNorm layer.

:func:`check_config` holds the rules a config alone can break; :func:`policy_for` decides
the policy once the model and the world size are known.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config.schema import ConfigError
from pipeline.config.schema_train import ModelConfig
from pipeline.distributed import collectives

log = logging.getLogger(__name__)

MODES = ("none", "frozen", "sync", "broadcast")


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    # timm's BatchNormAct2d and SyncBatchNorm derive from _BatchNorm too.
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_config(model: ModelConfig, *, chunk_size: int, batch_size_per_gpu: int) -> None:
    """The BatchNorm rules a config can break on its own (a one-line ConfigError each)."""
    if model.sync_bn and model.freeze_bn:
        raise ConfigError(
            "model.sync_bn=true with model.freeze_bn=true: frozen BatchNorm has no batch "
            "statistics to synchronise; set model.freeze_bn=false to train BatchNorm, or "
            "model.sync_bn=false"
        )
    batch, chunk = batch_size_per_gpu, chunk_size
    # pipeline.train.gradcache cuts the local batch into chunks of train.chunk_size; a last
    # chunk of one image cannot be normalised by a BatchNorm in training mode.
    if 0 < chunk < batch and (chunk == 1 or batch % chunk == 1) and not model.freeze_bn:
        fits = [c for c in range(max(chunk, 2), batch) if batch % c != 1][:1] or [0]
        raise ConfigError(
            f"train.chunk_size={chunk} cuts the per-GPU batch of {batch} images "
            f"(sampler.classes_per_batch x sampler.samples_per_class) into chunks of which "
            f"{'every one' if chunk == 1 else 'the last'} holds 1 image, and BatchNorm in "
            "training mode fails on a single image "
            f"(model.freeze_bn=false); choose a chunk size that leaves no 1-image chunk "
            f"(e.g. train.chunk_size={fits[0]}) or set model.freeze_bn=true"
        )


@dataclass(frozen=True)
class BatchNormPolicy:
    """What the trainer does about BatchNorm (see the module doc)."""

    mode: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"BatchNorm mode {self.mode!r}: use one of {MODES}")

    @property
    def broadcasts(self) -> bool:
        return self.mode == "broadcast"

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model to train: with ``sync``, its BatchNorm layers as SyncBatchNorm."""
        if self.mode == "sync":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def after_resume(self, model: nn.Module) -> None:
        """After the engine is built and a checkpoint (if any) restored. All ranks
        participate (with ``broadcast``): a checkpoint holds rank 0's statistics only."""
        if self.broadcasts:
            collectives.broadcast_buffers(model)

    def after_step(self, model: nn.Module) -> None:
        """All ranks participate (with ``broadcast``): every rank continues with rank 0's
        running statistics."""
        if self.broadcasts:
            collectives.broadcast_buffers(model)


def policy_for(
    model: nn.Module, model_cfg: ModelConfig, *, world_size: int, chunk_size: int, batch: int
) -> BatchNormPolicy:
    """The policy of ``model`` trained on ``world_size`` ranks; refuses SyncBatchNorm without
    CUDA and warns when the gradient cache would not be exact."""
    if not batchnorm_layers(model):
        return BatchNormPolicy("none")
    if model_cfg.freeze_bn:
        return BatchNormPolicy("frozen")
    if 0 < chunk_size < batch:
        log.warning(
            "train.chunk_size=%d with model.freeze_bn=false: BatchNorm normalises each "
            "chunk with its own statistics (and updates running statistics twice), so the "
            "gradient cache is not exactly the full-batch gradient; set model.freeze_bn=true "
            "for exact gradients",
            chunk_size,
        )
    if model_cfg.sync_bn and world_size > 1:
        if not torch.cuda.is_available():
            raise ConfigError(
                "model.sync_bn=true: SyncBatchNorm runs on CUDA devices only; on CPU set "
                "model.sync_bn=false (rank 0's statistics are then broadcast every step)"
            )
        return BatchNormPolicy("sync")
    return BatchNormPolicy("broadcast")
