"""The embedding model: shapes, frozen BatchNorm, weight files and their errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.config.schema_train import ModelConfig
from pipeline.model import build_model, load_trained_model
from pipeline.weights import ModelLoadError, read_state_dict, save_weights
from tests.tiny import tiny_model_config


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_output_is_l2_normalised_with_the_configured_dimension():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(embedding_dim=8)).eval()
    emb = model(_images())
    assert emb.shape == (6, 8)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(6), atol=1e-6, rtol=0)
    # The head sits on the backbone's pooled features.
    assert model.head.in_features == model.backbone.num_features


def test_frozen_batchnorm_keeps_statistics_and_affine_fixed():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(embedding_dim=8, freeze_bn=True))
    model.train()
    bns = model.batchnorm_layers()
    assert bns, "test_byobnet has BatchNorm layers"
    assert all(not bn.training for bn in bns)
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(_images()).sum().backward()
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Everything else trains.
    assert model.head.weight.grad is not None
    # In train mode the output equals eval mode's (no batch statistics anywhere).
    x = _images(4, seed=1)
    torch.testing.assert_close(model.train()(x), model.eval()(x))


def test_unfrozen_batchnorm_trains():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(embedding_dim=8, freeze_bn=False)).train()
    assert all(bn.training for bn in model.batchnorm_layers())
    assert all(p.requires_grad for bn in model.batchnorm_layers() for p in bn.parameters())


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ModelLoadError, match=r"model.backbone='no_such_net' is not a timm model"):
        build_model(ModelConfig(backbone="no_such_net"))


def test_weights_file_round_trip_and_architecture_metadata(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(embedding_dim=8)).eval()
    path = save_weights(model.state_dict(), model.architecture, tmp_path / "w.safetensors")
    loaded = load_trained_model(path)  # architecture from the file's metadata
    x = _images()
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert loaded.architecture == model.architecture
    # With a matching config too.
    torch.testing.assert_close(
        load_trained_model(path, tiny_model_config(embedding_dim=8))(x), model(x)
    )


def test_weights_of_another_architecture_are_refused_with_the_fix(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(embedding_dim=8))
    path = save_weights(model.state_dict(), model.architecture, tmp_path / "w.safetensors")
    with pytest.raises(
        ModelLoadError,
        match=r"holds a test_byobnet model.*model.backbone='resnet18'.*set model.backbone=test_byobnet",
    ):
        load_trained_model(path, ModelConfig(backbone="resnet18", embedding_dim=8))
    with pytest.raises(ModelLoadError, match=r"embedding_dim=8.*model.embedding_dim=16"):
        load_trained_model(path, tiny_model_config(embedding_dim=16))
    # A plain state dict without metadata: the shapes are checked.
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ModelLoadError, match=r"other shapes.*another architecture"):
        load_trained_model(tmp_path / "plain.pt", tiny_model_config(embedding_dim=16))
    with pytest.raises(ModelLoadError, match="does not record its architecture"):
        load_trained_model(tmp_path / "plain.pt")


class _Payload:
    """An arbitrary object: unpickling it would run code of the file's choosing."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_torch_files_are_read_without_unpickling_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload()}, path)
    with pytest.raises(ModelLoadError, match=r"weights_only=True"):
        read_state_dict(path)
    # A pickle file with a plain state dict is fine.
    torch.save({"model": {"module.w": torch.ones(2)}}, tmp_path / "ok.pt")
    state, _ = read_state_dict(tmp_path / "ok.pt")
    assert list(state) == ["w"]


def test_pretrained_path_loads_the_backbone_and_ignores_a_classifier(tmp_path):
    torch.manual_seed(1)
    source = build_model(tiny_model_config(embedding_dim=8))
    state = dict(source.backbone.state_dict())
    state["fc.weight"] = torch.zeros(10, 256)  # an ImageNet classifier the backbone lacks
    state["fc.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "backbone.pth")
    torch.manual_seed(2)  # different init: the file must win
    model = build_model(
        tiny_model_config(embedding_dim=8, pretrained_path=str(tmp_path / "backbone.pth"))
    )
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k


def test_pretrained_path_of_another_backbone_is_refused(tmp_path):
    torch.manual_seed(0)
    other = build_model(ModelConfig(backbone="test_efficientnet", embedding_dim=8))
    torch.save(other.backbone.state_dict(), tmp_path / "other.pth")
    with pytest.raises(
        ModelLoadError, match=r"model.pretrained_path=.*(other shapes|does not fit)"
    ):
        build_model(tiny_model_config(embedding_dim=8, pretrained_path=str(tmp_path / "other.pth")))
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_model(
            tiny_model_config(embedding_dim=8, pretrained_path=str(tmp_path / "missing.pth"))
        )


@pytest.mark.slow  # a fresh interpreter, timm and torch
def test_pretrained_without_network_or_cache_points_to_pretrained_path(tmp_path):
    # A fresh, offline Hugging Face cache: what a cluster node without network sees.
    code = (
        "from pipeline.config.schema_train import ModelConfig\n"
        "from pipeline.model import build_model\n"
        "build_model(ModelConfig(backbone='test_byobnet', pretrained=True))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ModelLoadError: model.pretrained=true" in proc.stderr
    assert "set model.pretrained_path=FILE" in proc.stderr
