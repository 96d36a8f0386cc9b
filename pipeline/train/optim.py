"""The torch optimizer and learning-rate schedule that DeepSpeed drives.

DeepSpeed receives a plain torch optimizer (its fused optimizers are CUDA kernels, and the
paper's recipe is torch's Adam) and a ``LambdaLR`` that it steps once per optimizer step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config.schema_train import OptimConfig


def lr_factor(step: int, optim_cfg: OptimConfig, total_steps: int) -> float:
    """The multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_steps`` (from 1/warmup_steps to 1), then 'constant',
    'step' (x gamma every ``step_size`` steps after warmup, the paper's decay) or 'cosine'
    (to 0 at ``total_steps``).
    """
    warmup = optim_cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    t = step - warmup
    if optim_cfg.scheduler == "constant":
        return 1.0
    if optim_cfg.scheduler == "step":
        return optim_cfg.gamma ** (t // optim_cfg.step_size)
    span = max(total_steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))


def param_groups(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict]:
    """Trainable parameters in two groups: the backbone at ``lr``, the head at
    ``lr * head_lr_mult`` (frozen BatchNorm parameters are left out)."""
    head = [p for n, p in model.named_parameters() if n.startswith("head.") and p.requires_grad]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    groups = [{"params": body, "lr": lr, "name": "backbone"}]
    groups.append({"params": head, "lr": lr * head_lr_mult, "name": "head"})
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, optim_cfg: OptimConfig, head_lr_mult: float = 1.0
) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over :func:`param_groups`, weight decay on every parameter (as the
    paper's Adam with weight decay 4e-4)."""
    groups = param_groups(model, optim_cfg.lr, head_lr_mult)
    # Fused kernels on CUDA only; on CPU the default (foreach) implementation.
    fused = True if torch.cuda.is_available() else None
    if optim_cfg.name == "adam":
        return torch.optim.Adam(groups, weight_decay=optim_cfg.weight_decay, fused=fused)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=optim_cfg.weight_decay, fused=fused)
    return torch.optim.SGD(
        groups,
        momentum=optim_cfg.momentum,
        weight_decay=optim_cfg.weight_decay,
        fused=fused,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` applying :func:`lr_factor` to every group's base learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim_cfg, total_steps)
    )
