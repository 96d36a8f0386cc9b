"""Checkpoints: safe loading, 'latest' and pruning, exact restore, fp32 export, DS config."""

from __future__ import annotations

import pickle

import pytest
import torch

from pipeline import weights
from pipeline.config.schema import ConfigError
from pipeline.config.schema_train import OptimConfig, TrainConfig
from pipeline.train import checkpoint
from pipeline.train.engine import deepspeed_config
from pipeline.train.safe_load import safe_load
from tests.dist_helpers import run_distributed
from tests.tiny import tiny_model_config


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_safe_load_refuses_arbitrary_objects(tmp_path):
    torch.save({"w": torch.ones(2), "x": _Payload()}, tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        safe_load(tmp_path / "bad.pt")
    torch.save({"w": torch.ones(2), "n": 3, "s": "ok"}, tmp_path / "good.pt")
    assert safe_load(tmp_path / "good.pt")["n"] == 3


def test_latest_and_pruning(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / checkpoint.tag_for(step)).mkdir()
    (tmp_path / "not_a_tag").mkdir()
    assert weights.latest_tag(tmp_path) is None
    checkpoint._write_latest(tmp_path, "step_00000004")
    # 'latest' is never pruned, even when older than the kept ones.
    assert checkpoint.prune(tmp_path, keep=2) == ["step_00000002"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "not_a_tag",
        "step_00000004",
        "step_00000006",
        "step_00000008",
    ]
    (tmp_path / "latest").write_text("step_00000099")
    with pytest.raises(checkpoint.CheckpointError, match="names checkpoint 'step_00000099'"):
        weights.latest_tag(tmp_path)


def test_deepspeed_config_file_is_merged_and_checked(tmp_path):
    cfg_file = tmp_path / "ds.yaml"
    cfg_file.write_text(
        "zero_optimization: {stage: 2, overlap_comm: true}\ncomms_logger: {enabled: false}\n"
    )
    ds = deepspeed_config(
        TrainConfig(zero_stage=2, precision="fp32", deepspeed_config=str(cfg_file)), 8, 4
    )
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["train_batch_size"] == 32 and ds["gradient_clipping"] == 1.0
    assert ds["comms_logger"] == {"enabled": False}
    with pytest.raises(
        ConfigError,
        match=r"stage=2 but train.zero_stage=0: they must agree; set train.zero_stage=2",
    ):
        deepspeed_config(TrainConfig(zero_stage=0, deepspeed_config=str(cfg_file)), 8, 1)
    cfg_file.write_text("gradient_clipping: 5.0\n")
    with pytest.raises(ConfigError, match=r"sets 'gradient_clipping'.*train.gradient_clipping"):
        deepspeed_config(TrainConfig(deepspeed_config=str(cfg_file)), 8, 1)
    with pytest.raises(ConfigError, match="does not exist"):
        deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "nope.yaml")), 8, 1)


def _engine(zero: int, precision: str, embedding_dim: int = 8):
    from pipeline.model import build_model
    from pipeline.train.engine import build_engine
    from pipeline.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = build_model(tiny_model_config(embedding_dim=embedding_dim))
    optim_cfg = OptimConfig(lr=1e-2, scheduler="step", step_size=2, gamma=0.5)
    opt = build_optimizer(model, optim_cfg)
    train_cfg = TrainConfig(zero_stage=zero, precision=precision, gradient_clipping=1.0)
    engine = build_engine(model, opt, build_scheduler(opt, optim_cfg, 10), train_cfg, 8)
    checkpoint.install_safe_loading(engine)
    return engine


def _step(engine, seed: int) -> None:
    from pipeline.loss import SmoothAPLoss

    g = torch.Generator().manual_seed(seed)
    emb = engine(torch.randn(8, 3, 32, 32, generator=g))
    engine.backward(SmoothAPLoss(0.05)(emb, torch.arange(2).repeat_interleave(4)))
    engine.step()


def _params(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _restore_worker(rank: int, world_size: int, root: str) -> None:
    torch.set_num_threads(1)
    # ZeRO 2: optimizer partitions with DeepSpeed's LossScaler and fragment_address records,
    # read back through the safe loader.
    engine = _engine(zero=2, precision="fp32")
    _step(engine, 1)
    _step(engine, 2)
    arch = engine.module.architecture
    checkpoint.save(engine, root, 2, {"step": 2, "architecture": arch, "note": "x"}, keep=1)
    _step(engine, 3)
    want = _params(engine)
    want_lr = engine.get_lr()

    fresh = _engine(zero=2, precision="fp32")
    # The save's last act: a manifest that verifies.
    assert checkpoint.manifest.verify(f"{root}/step_00000002") is None
    client = checkpoint.load_tag(fresh, root, weights.latest_tag(root))
    assert client["step"] == 2 and client["note"] == "x"
    _step(fresh, 3)
    got = _params(fresh)
    # Weights, Adam moments and the schedule all restored: the next step is bitwise equal.
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert fresh.get_lr() == want_lr

    other = _engine(zero=2, precision="fp32", embedding_dim=16)
    file = weights.model_states_file(root)
    found = weights.read_client_state(file)["architecture"]
    try:
        checkpoint.check_architecture(found, other.module.architecture, file)
    except checkpoint.CheckpointError as e:
        assert "embedding_dim" in str(e) and "new train.output_dir" in str(e)
    else:
        raise AssertionError("a checkpoint of another architecture was loaded")

    # bf16 (autocast): weights, optimizer and checkpoints stay fp32, the forward is bf16.
    from pipeline.train.engine import fp32_state_dict

    engine = _engine(zero=1, precision="bf16")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (engine(x).float() - engine.module(x)).abs().max().item()
    assert 1e-5 < diff < 0.1, diff  # bf16 rounding, not another computation
    for s in range(3):
        _step(engine, 10 + s)
    state = fp32_state_dict(engine)
    module = engine.module.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert all(torch.equal(state[k], module[k].float()) for k in module)
    checkpoint.save(engine, root + "_bf16", 3, {"step": 3}, keep=1)
    bf16_root = root + "_bf16"
    client = checkpoint.load_tag(_engine(zero=1, precision="bf16"), bf16_root, "step_00000003")
    assert client["step"] == 3


@pytest.mark.slow
def test_restore_is_exact_and_bf16_keeps_fp32_weights(tmp_path):
    root = tmp_path / "ckpt"
    run_distributed(_restore_worker, 1, str(root))
    # keep=1 and a single save: exactly one complete tag, named by 'latest'.
    assert weights.latest_tag(root) == "step_00000002"
    files = sorted(p.name for p in (root / "step_00000002").iterdir())
    assert "mp_rank_00_model_states.pt" in files
    assert any(f.startswith("zero_pp_rank_0") for f in files)


def test_train_state_is_versioned_and_reads_the_previous_format(tmp_path):
    state = checkpoint.TrainState(
        step=12,
        epoch=1,
        step_in_epoch=4,
        sampler_seed=3,
        train_seed=0,
        world_size=2,
        architecture={"backbone": "resnet18", "feature_dim": 512, "embedding_dim": 16},
        mlflow_run_id="abc",
    )
    entries = state.to_client_state()
    assert entries["version"] == checkpoint.TRAIN_STATE_VERSION
    assert checkpoint.TrainState.from_client_state(entries, "f") == state
    # The untyped dict of the first format (version 1, the same entries) still loads.
    legacy = {**entries, "version": 1}
    assert checkpoint.TrainState.from_client_state(legacy, "f") == state
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"^ckpt/x\.pt: train state version 99 is not one this code reads .*new train\.output_dir$",
    ):
        checkpoint.TrainState.from_client_state({**entries, "version": 99}, "ckpt/x.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"lacks \['epoch'"):
        checkpoint.TrainState.from_client_state({"version": 2, "step": 1}, "f")
    # An architecture mismatch names both.
    with pytest.raises(checkpoint.CheckpointError, match=r"resnet50.*config builds.*resnet18"):
        checkpoint.check_architecture({"backbone": "resnet50"}, state.architecture, "f")


def test_model_states_file_follows_latest(tmp_path):
    assert weights.model_states_file(tmp_path) is None
    tag = tmp_path / checkpoint.tag_for(4)
    tag.mkdir()
    (tag / weights.MODEL_STATES).write_bytes(b"")
    assert weights.model_states_file(tag) == tag / weights.MODEL_STATES
    checkpoint._write_latest(tmp_path, tag.name)
    assert weights.model_states_file(tmp_path) == tag / weights.MODEL_STATES


def _fake_checkpoint(root, step: int, complete: bool = True):
    from pipeline.train import manifest

    folder = root / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    (folder / weights.MODEL_STATES).write_bytes(b"m" * 100)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 300)
    if complete:
        manifest.write(folder, {"step": step})
    return folder


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    assert checkpoint.resumable_tag(tmp_path) is None
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 8)
    checkpoint._write_latest(tmp_path, "step_00000008")
    assert checkpoint.resumable_tag(tmp_path) == "step_00000008"
    # 'latest' names a truncated checkpoint: the intact previous one is used, with a warning
    # that names the damaged file.
    optim = tmp_path / "step_00000008" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(b"o" * 120)
    with caplog.at_level("WARNING", logger="pipeline.train.checkpoint"):
        assert checkpoint.resumable_tag(tmp_path) == "step_00000004"
    assert "step_00000008 (zero_pp_rank_0_mp_rank_00_optim_states.pt has 120 bytes" in caplog.text
    # A newer folder without a manifest (its save never finished) is never used either.
    _fake_checkpoint(tmp_path, 12, complete=False)
    assert checkpoint.resumable_tag(tmp_path) == "step_00000004"
    (tmp_path / "step_00000004" / weights.MODEL_STATES).write_bytes(b"x" * 100)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"^no complete checkpoint under .*SHA-256"
    ):
        checkpoint.resumable_tag(tmp_path)


def _disk_full_worker(rank: int, world_size: int, root: str) -> None:
    torch.set_num_threads(1)
    engine = _engine(zero=0, precision="fp32")
    _step(engine, 1)
    try:
        checkpoint.save(engine, root, 1, {"step": 1}, keep=2)
    except checkpoint.CheckpointError as e:
        message = str(e)
    else:
        raise AssertionError("a checkpoint larger than the disk was 'saved'")
    assert message.startswith(
        f"checkpoint step_00000001 cannot be written under {root}: the disk is full"
    )
    assert "no earlier checkpoint exists" in message
    assert not (__import__("pathlib").Path(root) / "latest").exists()


def test_a_full_disk_is_reported_as_such(tmp_path):
    """A real, tiny tmpfs (root may mount one): the save is refused before DeepSpeed writes."""
    import subprocess

    root = tmp_path / "small"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run_distributed(_disk_full_worker, 1, str(root / "ckpt"))
    finally:
        subprocess.run(["umount", str(root)], check=True)
