"""Optimizer groups, the learning-rate schedule, and the refusal of gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config.load import load_config
from pipeline.config.schema import ConfigError
from pipeline.config.schema_train import OptimConfig
from pipeline.model import build_model
from pipeline.train.optim import build_optimizer, build_scheduler, lr_factor
from tests.tiny import tiny_model_config


def _reference_lr(
    step: int, lr: float, sched: str, warmup: int, size: int, gamma: float, total: int
):
    # Written from the definitions in OptimConfig's docstrings, step by step.
    if step < warmup:
        return lr * (step + 1) / warmup
    t = step - warmup
    if sched == "constant":
        return lr
    if sched == "step":
        factor = 1.0
        for _ in range(t // size):
            factor *= gamma
        return lr * factor
    return lr * (1 + math.cos(math.pi * t / (total - warmup))) / 2


@pytest.mark.parametrize("sched", ["constant", "step", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_scheduler_follows_the_definition(sched, warmup):
    cfg = OptimConfig(
        name="sgd", lr=0.1, scheduler=sched, step_size=4, gamma=0.5, warmup_steps=warmup
    )
    total = 20
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    scheduler = build_scheduler(opt, cfg, total)
    for step in range(total):
        want = _reference_lr(step, 0.1, sched, warmup, 4, 0.5, total)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12), step
        assert lr_factor(step, cfg, total) * 0.1 == pytest.approx(want, rel=1e-12)
        opt.step()
        scheduler.step()


def test_head_gets_its_learning_rate_multiplier_and_frozen_bn_is_left_out():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(embedding_dim=8, head_lr_mult=10.0))
    opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=4e-4), head_lr_mult=10.0)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["head"]["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in model.head.parameters()}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable
    frozen = {id(p) for bn in model.batchnorm_layers() for p in bn.parameters()}
    assert frozen and not (frozen & in_opt)
    assert all(g["weight_decay"] == 4e-4 for g in opt.param_groups)
    assert isinstance(opt, torch.optim.Adam)


def test_gradient_accumulation_is_refused_and_points_to_the_gradient_cache():
    with pytest.raises(
        ConfigError, match=r"gradient_accumulation_steps=2.*changes the objective.*train.chunk_size"
    ):
        load_config(None, ["train.gradient_accumulation_steps=2"])
