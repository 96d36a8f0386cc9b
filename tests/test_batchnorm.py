"""The BatchNorm policy (pipeline.train.batchnorm): which mode a model and config get, the
config rules, the CUDA-only refusal, and the broadcast in 2 real gloo processes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config.schema import ConfigError
from pipeline.config.schema_train import ModelConfig
from pipeline.train.batchnorm import BatchNormPolicy, check_config, policy_for
from tests.dist_helpers import run_distributed


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())


def _policy(model: nn.Module, world: int = 1, chunk: int = 0, **fields) -> BatchNormPolicy:
    cfg = ModelConfig(backbone="x", **fields)
    return policy_for(model, cfg, world_size=world, chunk_size=chunk, batch=8)


def test_the_mode_follows_the_model_and_the_config():
    assert _policy(nn.Linear(2, 2)).mode == "none"
    assert _policy(_net(), freeze_bn=True).mode == "frozen"
    assert _policy(_net(), freeze_bn=False).mode == "broadcast"
    # One rank: nothing to synchronise, and the broadcast is a no-op.
    assert _policy(_net(), freeze_bn=False, sync_bn=True).mode == "broadcast"
    sync = BatchNormPolicy("sync").prepare(_net())
    assert isinstance(sync[1], nn.SyncBatchNorm)
    assert isinstance(BatchNormPolicy("broadcast").prepare(_net())[1], nn.BatchNorm2d)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_sync_batchnorm_without_cuda_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^model\.sync_bn=true: SyncBatchNorm runs on CUDA"):
        _policy(_net(), world=2, freeze_bn=False, sync_bn=True)


def test_chunks_with_trainable_batchnorm_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.train.batchnorm"):
        _policy(_net(), chunk=4, freeze_bn=True)
        assert not caplog.records
        _policy(_net(), chunk=4, freeze_bn=False)
    assert "train.chunk_size=4 with model.freeze_bn=false" in caplog.text


def test_config_rules():
    frozen, trainable = ModelConfig(freeze_bn=True), ModelConfig(freeze_bn=False)
    check_config(frozen, chunk_size=1, batch_size_per_gpu=8)  # frozen: any chunk
    check_config(trainable, chunk_size=4, batch_size_per_gpu=8)
    with pytest.raises(ConfigError, match=r"chunks of which the last holds 1 image.*=4\)"):
        check_config(trainable, chunk_size=3, batch_size_per_gpu=7)
    with pytest.raises(ConfigError, match=r"^model\.sync_bn=true with model\.freeze_bn=true"):
        check_config(ModelConfig(sync_bn=True), chunk_size=0, batch_size_per_gpu=8)


def _broadcast(rank: int, world: int, out: str) -> None:
    torch.manual_seed(rank)
    net = _net().train()
    net(torch.randn(4, 3, 6, 6))  # each rank's own running statistics
    bn = net[1]
    own = bn.running_mean.clone()
    BatchNormPolicy("broadcast").after_step(net)
    torch.save({"mean": bn.running_mean, "var": bn.running_var, "own": own}, f"{out}{rank}.pt")
    frozen = _net()
    before = frozen[1].running_mean.clone() + rank
    frozen[1].running_mean.copy_(before)
    BatchNormPolicy("frozen").after_step(frozen)  # no collective, nothing changes
    assert torch.equal(frozen[1].running_mean, before)


@pytest.mark.distributed
def test_broadcast_gives_every_rank_rank_0s_statistics(tmp_path: Path):
    run_distributed(_broadcast, 2, str(tmp_path / "rank"))
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(a["own"], b["own"])  # the ranks' statistics differed
    assert torch.equal(a["mean"], a["own"]) and torch.equal(b["mean"], a["own"])
    assert torch.equal(a["var"], b["var"])
