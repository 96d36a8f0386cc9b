"""The whole run configuration: one section per component, and its plain-dict form.

The sections are defined in ``pipeline.config.schema`` (data, sampler),
``pipeline.config.schema_train`` (model, loss, optim, train) and
``pipeline.config.schema_services`` (eval, tracking, launch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.schema import DataConfig, SamplerConfig
from pipeline.config.schema_services import EvalConfig, LaunchConfig, TrackingConfig
from pipeline.config.schema_train import LossConfig, ModelConfig, OptimConfig, TrainConfig


@dataclass
class RunConfig:
    """The whole run; components receive only their own section."""

    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def to_dict(cfg: Any) -> dict:
    """The config as plain dicts and lists (what YAML and MLflow params need)."""
    return dataclasses.asdict(cfg)
