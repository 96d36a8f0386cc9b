"""Elastic resume: checkpoints of N ranks restored exactly on M ranks, ZeRO 0/1/2.

Each distributed run builds the engines of all three stages in one set of processes (a
process start, mostly importing DeepSpeed, costs far more than a tiny engine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import weights
from pipeline.config.schema import ConfigError
from pipeline.train import elastic
from pipeline.train.safe_load import safe_load
from tests.dist_helpers import run_distributed
from tests.tiny import tiny_model_config

# (ZeRO stage, optimizer): every stage, and each optimizer's state (Adam/AdamW moments and
# step, SGD momentum) through the ZeRO re-cut.
CASES = ((0, "adam"), (1, "adamw"), (2, "adam"), (2, "sgd"))
# An odd embedding size makes the head group's size odd, so ZeRO pads its partitions on 2 and
# 4 ranks: the re-cut must skip the padding.
EMBEDDING_DIM = 7


def _engine(zero: int, optim: str = "adam"):
    from pipeline.config.schema_train import OptimConfig, TrainConfig
    from pipeline.model import build_model
    from pipeline.train.checkpoint import install_safe_loading
    from pipeline.train.engine import build_engine
    from pipeline.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = build_model(tiny_model_config(embedding_dim=EMBEDDING_DIM))
    optim_cfg = OptimConfig(name=optim, lr=1e-2, scheduler="step", step_size=2, gamma=0.5)
    opt = build_optimizer(model, optim_cfg, head_lr_mult=10.0)  # two parameter groups
    train_cfg = TrainConfig(zero_stage=zero, precision="fp32", gradient_clipping=1.0)
    engine = build_engine(model, opt, build_scheduler(opt, optim_cfg, 10), train_cfg, 8)
    install_safe_loading(engine)
    return engine


def _train_steps(engine, rank: int, steps: int) -> None:
    from pipeline.loss import SmoothAPLoss

    for s in range(steps):
        # Other images on each rank, as in training.
        g = torch.Generator().manual_seed(100 * s + rank)
        emb = engine(torch.randn(8, 3, 32, 32, generator=g))
        engine.backward(SmoothAPLoss(0.05)(emb, torch.arange(2).repeat_interleave(4)))
        engine.step()


def _folder(out: str, world: int, stage: int, optim: str) -> Path:
    return Path(out) / f"w{world}_z{stage}_{optim}"


def _save(rank: int, world: int, out: str) -> None:
    from pipeline.train import checkpoint

    for stage, optim in CASES:
        engine = _engine(stage, optim)
        _train_steps(engine, rank, 3)  # the step schedule halves the LR at step 2
        root = _folder(out, world, stage, optim)
        checkpoint.save(engine, root, 3, {"step": 3, "world_size": world}, keep=1)
        # All ranks participate.
        state = elastic.full_state(engine)
        module = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        if rank == 0:
            torch.save({"state": state, "module": module}, root / "before.pt")


def _load(rank: int, world: int, out: str, saved_world: int) -> None:

    for stage, optim in CASES:
        root = _folder(out, saved_world, stage, optim)
        before = safe_load(root / "before.pt")
        where = f"ZeRO {stage} {optim}, {saved_world} -> {world} ranks"
        engine = _engine(stage, optim)
        # The comparison is not vacuous: a fresh engine differs.
        assert elastic.state_differences(before["state"], elastic.full_state(engine)), where
        client = elastic.load(engine, root, weights.latest_tag(root))
        assert client["step"] == 3 and client["world_size"] == saved_world
        after = elastic.full_state(engine)  # all ranks participate
        diff = elastic.state_differences(before["state"], after)
        assert not diff, f"{where}: {diff}"
        assert before["state"]["optimizer"] and before["state"]["global_steps"] == 3
        module = engine.module.state_dict()
        bad = [k for k, v in before["module"].items() if not torch.equal(module[k], v)]
        assert not bad, f"{where}: module {bad}"
        # fp32: the module weights are the masters.
        assert all(torch.equal(module[k], v) for k, v in after["masters"].items())
        # Training continues on the new world size from the restored state.
        _train_steps(engine, rank, 1)
        assert engine.global_steps == 4
        if stage == 1:
            try:
                elastic.load(_engine(2, optim), root, weights.latest_tag(root))
            except elastic.ElasticResumeError as e:
                assert "set train.zero_stage=1" in str(e), e
            else:
                raise AssertionError("a ZeRO-1 checkpoint was loaded into a ZeRO-2 engine")


def _worker(rank: int, world: int, out: str, save: bool, load_from: tuple[int, ...]) -> None:
    """Save this world size's checkpoints and/or load those of ``load_from`` world sizes
    (one set of processes for both: starting one costs more than a tiny engine)."""
    torch.set_num_threads(1)
    if save:
        _save(rank, world, out)
    for saved_world in load_from:
        _load(rank, world, out, saved_world)


@pytest.mark.distributed
def test_resume_on_one_and_two_ranks_is_exact(tmp_path):
    """ZeRO 0/1/2 x (1 -> 2, 2 -> 1), Adam/AdamW/SGD: weights, fp32 masters, optimizer state and step, LR
    schedule and DeepSpeed's step counter equal to the state before saving."""
    out = str(tmp_path)
    run_distributed(_worker, 1, out, True, ())
    run_distributed(_worker, 2, out, True, (1,))
    run_distributed(_worker, 1, out, False, (2,))


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_grid_is_exact(tmp_path):
    """The issue's grid, ZeRO 0/1/2 x (1 -> 4, 4 -> 2, 4 -> 1), with the same checks."""
    out = str(tmp_path)
    run_distributed(_worker, 1, out, True, ())
    run_distributed(_worker, 4, out, True, (1,))
    run_distributed(_worker, 2, out, False, (4,))
    run_distributed(_worker, 1, out, False, (4,))


def test_classes_per_batch_keeps_the_global_batch():
    assert elastic.classes_per_batch_for(4, 4, 2) == 8
    assert elastic.classes_per_batch_for(4, 4, 1) == 16
    assert elastic.classes_per_batch_for(1, 16, 4) == 4
    assert elastic.classes_per_batch_for(2, 6, 2) == 6
    with pytest.raises(
        ConfigError,
        match=r"^sampler.classes_per_batch: the checkpoint's global batch has 16 classes "
        r"\(4 ranks x 4\), which 3 ranks cannot share equally; resume on a number of ranks "
        r"that divides 16 \(1, 2, 4, 8, 16\)",
    ):
        elastic.classes_per_batch_for(4, 4, 3)


def test_stream_position_is_the_global_step():
    assert elastic.stream_position(0, 5) == (0, 0)
    assert elastic.stream_position(12, 5) == (2, 2)


def _fake_checkpoint(folder: Path, stage: int, world: int, ranks_written: int) -> None:
    folder.mkdir(parents=True)
    ds_config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 16}
    torch.save({"dp_world_size": world, "ds_config": ds_config}, folder / elastic.MODEL_STATES)
    for r in range(ranks_written):
        (folder / elastic.optimizer_partition_file(r)).write_bytes(b"")


def test_saved_layout_and_one_line_errors(tmp_path):
    good = tmp_path / "good"
    _fake_checkpoint(good, stage=2, world=4, ranks_written=4)
    layout = elastic.saved_layout(good)
    assert (layout.world_size, layout.zero_stage, layout.batch_size_per_gpu) == (4, 2, 16)
    assert layout.classes_per_batch(samples_per_class=4) == 4

    with pytest.raises(elastic.ElasticResumeError, match=r"nope holds no DeepSpeed checkpoint"):
        elastic.saved_layout(tmp_path / "nope")
    _fake_checkpoint(tmp_path / "z3", stage=3, world=4, ranks_written=0)
    with pytest.raises(elastic.ElasticResumeError, match=r"z3 is a ZeRO-3 checkpoint.*on 4 ranks"):
        elastic.saved_layout(tmp_path / "z3")
    _fake_checkpoint(tmp_path / "part", stage=1, world=4, ranks_written=3)
    with pytest.raises(
        elastic.ElasticResumeError,
        match=r"part was written by 4 ranks but lacks zero_pp_rank_3_mp_rank_00_optim_states.pt",
    ):
        elastic.saved_layout(tmp_path / "part")
    for err in ("nope", "z3", "part"):
        try:
            elastic.saved_layout(tmp_path / err)
        except elastic.ElasticResumeError as e:
            assert "\n" not in str(e)
