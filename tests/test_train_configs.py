"""The shipped experiment, demo and DeepSpeed configs load, validate and merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config.load import load_config
from pipeline.config.schema import ConfigError
from pipeline.config.schema_train import TrainConfig
from pipeline.train.engine import deepspeed_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [*sorted((ROOT / "conf" / "experiments").glob("*.yaml")), ROOT / "conf" / "demo.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_build_a_deepspeed_config(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # deepspeed_config paths are relative to the repository
    cfg = load_config(path)
    ds = deepspeed_config(cfg.train, cfg.sampler.batch_size_per_gpu, 8)
    assert ds["zero_optimization"]["stage"] == cfg.train.zero_stage
    assert ds["gradient_clipping"] == cfg.train.gradient_clipping
    assert ds["train_batch_size"] == 8 * cfg.sampler.batch_size_per_gpu


def test_paper_settings_in_the_paper_experiments():
    for name in ("sop", "inat"):
        cfg = load_config(ROOT / "conf" / "experiments" / f"{name}.yaml")
        assert cfg.model.backbone == "resnet50" and cfg.model.embedding_dim == 512
        assert cfg.sampler.batch_size_per_gpu == 384 and cfg.sampler.samples_per_class == 4
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adam", 1e-5, 4e-4)
        assert cfg.optim.scheduler == "step" and cfg.loss.temperature == 0.01
        assert cfg.loss.query_in_positives and cfg.model.freeze_bn


def test_bf16_file_applies_to_bf16_only(monkeypatch):
    monkeypatch.chdir(ROOT)
    bf16 = TrainConfig(precision="bf16", deepspeed_config="conf/deepspeed/bf16.yaml")
    ds = deepspeed_config(bf16, 64, 2)
    assert ds["torch_autocast"]["enabled"] and ds["torch_autocast"]["dtype"] == "bfloat16"
    assert "torch.nn.modules.conv.Conv2d" in ds["torch_autocast"]["lower_precision_safe_modules"]
    # Without the file every gradient travels in fp32.
    assert (
        deepspeed_config(TrainConfig(precision="bf16"), 64, 2)["torch_autocast"][
            "lower_precision_safe_modules"
        ]
        == []
    )
    assert "torch_autocast" not in deepspeed_config(TrainConfig(precision="fp32"), 64, 2)
    fp32 = TrainConfig(precision="fp32", deepspeed_config="conf/deepspeed/bf16.yaml")
    with pytest.raises(
        ConfigError,
        match=r"sets torch_autocast, but train.precision='fp32' runs without autocast; set train.precision=bf16",
    ):
        deepspeed_config(fp32, 64, 2)
    if not torch.cuda.is_available():  # 'auto' is fp32 without CUDA
        auto = TrainConfig(precision="auto", deepspeed_config="conf/deepspeed/bf16.yaml")
        with pytest.raises(ConfigError, match=r"runs in fp32 on this machine \(no CUDA\)"):
            deepspeed_config(auto, 64, 2)
