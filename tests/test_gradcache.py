"""The gradient cache gives the full-batch gradients: 1 process, and 2 gloo processes with
DeepSpeed (ZeRO 0 and 2) against the single-process full batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config.schema_train import OptimConfig, TrainConfig
from pipeline.loss import SmoothAPLoss
from pipeline.model import build_model
from pipeline.train.gradcache import forward_backward
from tests.dist_helpers import run_distributed
from tests.tiny import tiny_model_config

TINY = tiny_model_config(embedding_dim=8, freeze_bn=True)
LOSS = SmoothAPLoss(temperature=0.05)
LR = 1024.0


def _batch(n_classes: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_classes * k, 3, 32, 32, generator=g), torch.arange(
        n_classes
    ).repeat_interleave(k)


def _tiny_model() -> nn.Module:
    model = build_model(TINY)
    # timm zero-initialises the last BatchNorm of each residual branch; frozen, that would
    # leave most convolutions without gradient. Ones make every layer take part.
    for bn in model.batchnorm_layers():
        nn.init.ones_(bn.weight)
    return model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 5, 11])
def test_chunked_gradients_equal_full_batch_gradients(chunk):
    torch.manual_seed(0)
    model = _tiny_model().double()
    images, labels = _batch(3, 4, seed=1)
    images = images.double()

    ref_loss = LOSS(model(images), labels)
    ref_loss.backward()
    ref = _grads(model)
    model.zero_grad()

    loss = forward_backward(model, images, labels, LOSS, chunk_size=chunk)
    got = _grads(model)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert got.keys() == ref.keys() and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)


class _Dropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Dropout(0.5), nn.Linear(16, 4))

    def forward(self, x):
        return nn.functional.normalize(self.net(x), dim=1)


def test_random_numbers_are_replayed_in_the_second_forward():
    torch.manual_seed(0)
    model = _Dropout().double()
    images = torch.randn(12, 3, 2, 2, dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(4)
    chunk = 5

    # Reference: the same chunked forwards (same draws from the generator), one graph.
    torch.manual_seed(7)
    LOSS(torch.cat([model(x) for x in images.split(chunk)]), labels).backward()
    ref, rng_after_ref = _grads(model), torch.get_rng_state()
    model.zero_grad()

    torch.manual_seed(7)
    forward_backward(model, images, labels, LOSS, chunk_size=chunk)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-9, atol=1e-12, msg=name)
    # The generator ends where one pass of draws leaves it (the replay is not extra draws).
    assert torch.equal(torch.get_rng_state(), rng_after_ref)


def _deepspeed_worker(rank: int, world_size: int, init_path: str, out_path: str, zero: int) -> None:
    from pipeline.distributed import collectives
    from pipeline.train.engine import build_engine
    from pipeline.train.optim import build_optimizer, build_scheduler

    torch.set_num_threads(1)  # two processes on two cores: no oversubscription
    images, labels = torch.load(init_path)["batch"]
    n = images.shape[0] // world_size
    mine = slice(rank * n, (rank + 1) * n)
    model = build_model(TINY)
    model.load_state_dict(torch.load(init_path)["state"])
    before = {k: v.clone() for k, v in model.named_parameters()}
    # SGD without clipping: the update is -lr x the (averaged) gradient; a large lr keeps
    # the update far above the parameters' float32 rounding.
    optim_cfg = OptimConfig(name="sgd", lr=LR, momentum=0.0, weight_decay=0.0, scheduler="constant")
    opt = build_optimizer(model, optim_cfg)
    train_cfg = TrainConfig(zero_stage=zero, gradient_clipping=0.0, precision="fp32")
    engine = build_engine(model, opt, build_scheduler(opt, optim_cfg, 1), train_cfg, n)
    loss = forward_backward(
        engine,
        images[mine],
        labels[mine],
        LOSS,
        chunk_size=3,
        backward=engine.backward,
        set_boundary=engine.set_gradient_accumulation_boundary,
    )
    engine.step()
    mean_loss = collectives.all_reduce_sum(loss) / world_size
    step = {k: (before[k] - p.detach()) / LR for k, p in engine.module.named_parameters()}
    result = {"step": step, "loss": mean_loss}
    if rank == 0:
        torch.save(result, out_path)


# ZeRO 2 partitions gradients and optimizer state: the reduction path differs from ZeRO 0.
ZERO_STAGES = {1: (0,), 2: (0, 2)}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_deepspeed_chunked_step_equals_single_process_full_batch(tmp_path, world_size):
    torch.manual_seed(0)
    model = _tiny_model()
    # Classes shared across the two ranks' halves: ranks must rank against each other.
    images, labels = _batch(4, 4, seed=3)
    labels = labels[torch.randperm(16, generator=torch.Generator().manual_seed(4))]
    init = tmp_path / "init.pt"
    torch.save({"state": model.state_dict(), "batch": (images, labels)}, init)
    ref_loss = LOSS(model(images), labels)
    ref_loss.backward()
    ref = _grads(model)
    scale = max(g.abs().max().item() for g in ref.values())

    # One set of processes per ZeRO stage: one DeepSpeed engine per process, as in training.
    results = {}
    for zero in ZERO_STAGES[world_size]:
        out = tmp_path / f"out{zero}.pt"
        run_distributed(_deepspeed_worker, world_size, str(init), str(out), zero)
        results[zero] = torch.load(out)
    for zero, got in results.items():
        assert got["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-5), zero
        assert ref.keys() <= got["step"].keys()
        for name, g in ref.items():
            assert g.abs().max() > 0, name  # every layer has a gradient to compare
            torch.testing.assert_close(
                got["step"][name], g, rtol=1e-4, atol=1e-5 * scale, msg=f"ZeRO {zero}: {name}"
            )
