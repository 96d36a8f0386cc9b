"""The parts of a training run, built from its config and plan: :func:`build_components`.

One function per part, each given only its own config section: the model (with the BatchNorm
policy applied), the optimizer and schedule, the DeepSpeed engine (reading its checkpoints
safely) and the loss. The trainer receives the result, :class:`TrainParts`, and builds nothing
itself, so a benchmark or a test can build the parts once and swap one (a loss with state).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.config.runconfig import RunConfig
from pipeline.config.schema_train import LossConfig
from pipeline.loss import SmoothAPLoss
from pipeline.model import EmbeddingModel, build_model
from pipeline.train import checkpoint
from pipeline.train.batchnorm import BatchNormPolicy, policy_for
from pipeline.train.engine import build_engine
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.train.plan import RunPlan
from pipeline.train.warmstart import load_init_weights


@dataclass
class TrainParts:
    """What the trainer trains with."""

    model: EmbeddingModel
    """The network (``engine.module``)."""
    engine: Any
    """The DeepSpeed engine: forward, backward, step, checkpoints."""
    scheduler: torch.optim.lr_scheduler.LRScheduler
    """The learning-rate schedule (stepped by the engine)."""
    loss: nn.Module
    """``loss(embeddings, labels)``; may keep state across steps (pipeline.loss.LossState)."""
    batchnorm: BatchNormPolicy
    """Frozen, synchronised or broadcast BatchNorm (pipeline.train.batchnorm)."""


def set_determinism(on: bool) -> None:
    """Deterministic algorithms (``train.deterministic``), before anything is built."""
    if not on:
        return
    # cuBLAS needs a fixed workspace for deterministic results (read when CUDA starts).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def build_loss(loss_cfg: LossConfig) -> nn.Module:
    return SmoothAPLoss(
        loss_cfg.temperature, loss_cfg.query_in_positives, loss_cfg.query_chunk_size
    )


def build_components(cfg: RunConfig, plan: RunPlan) -> TrainParts:
    """Model, BatchNorm policy, optimizer, schedule, engine and loss of the run ``cfg``
    (already adapted to ``plan``: ``plan.apply(cfg)``). All ranks participate (DeepSpeed
    broadcasts rank 0's initial weights)."""
    if cfg.sampler.classes_per_batch != plan.classes_per_batch:
        raise ValueError("build_components needs plan.apply(cfg), not the config as loaded")
    set_determinism(cfg.train.deterministic)
    batch = cfg.sampler.batch_size_per_gpu
    total_steps = cfg.train.epochs * cfg.sampler.steps_per_epoch
    # Initial weights from train.seed, the same on every rank (DeepSpeed also broadcasts them).
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    load_init_weights(model, cfg.train.init_weights)  # a new run from trained weights
    batchnorm = policy_for(
        model,
        cfg.model,
        world_size=plan.world_size,
        chunk_size=cfg.train.chunk_size,
        batch=batch,
    )
    model = batchnorm.prepare(model)
    optimizer = build_optimizer(model, cfg.optim, cfg.model.head_lr_mult)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    # All ranks participate (process group, weight broadcast).
    engine = build_engine(model, optimizer, scheduler, cfg.train, batch)
    checkpoint.install_safe_loading(engine)
    return TrainParts(
        model=engine.module,
        engine=engine,
        scheduler=scheduler,
        loss=build_loss(cfg.loss),
        batchnorm=batchnorm,
    )
