"""The two collective timeouts (pipeline.distributed.group, pipeline.train.trainer): the short
step timeout of the steady training steps and the long one of slow work on one rank, with
real gloo processes and the real trainer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.config.load import load_config
from pipeline.config.schema import ConfigError
from pipeline.config.schema_train import TrainConfig
from pipeline.distributed import group
from tests.tiny import tiny_run_config, write_config

STEP_TIMEOUT_S = 2.0
LONG_TIMEOUT_S = 30.0
STALL_S = 4.0
CHECKPOINT_STEP = 3  # a steady step: steps 1 and 2 are the warm-up (train.step_timeout_after)
STALLED_STEP = 4  # the steady step after that checkpoint


def _group_timeouts() -> list[float]:
    """The timeout each process group of this process has now: the job's and DeepSpeed's."""
    import torch
    import torch.distributed as dist

    groups = list(dist.distributed_c10d._world.pg_map)
    cpu = torch.device("cpu")
    return [pg._get_backend(cpu).options._timeout.total_seconds() for pg in groups]


def _stalling_run(rank: int, world: int, config: str, out: str) -> None:
    """Train ``config``. Rank 0 stalls STALL_S inside the checkpoint save of CHECKPOINT_STEP
    (the long timeout: rank 1 waits in the save's collectives); rank 1 stalls in step
    STALLED_STEP until rank 0 has failed (the step timeout), at most 2 x STALL_S. Each rank
    writes what it saw to ``out.<rank>``."""
    import torch

    from pipeline.train import checkpoint
    from pipeline.train.entry import open_trainer
    from pipeline.train.trainer import Trainer

    torch.set_num_threads(1)
    seen: dict = {}
    failed = Path(f"{out}.failed")
    save_state, train_step = checkpoint.save_state, Trainer.train_step

    def slow_save(*args, **kwargs):
        t0 = time.monotonic()
        if rank == 0:
            time.sleep(STALL_S)
        tag = save_state(*args, **kwargs)
        seen["save_s"] = time.monotonic() - t0
        return tag

    def stalling_step(self, images, labels, **kwargs):
        if self.step == STALLED_STEP - 1:
            seen["timeout_in_step"] = group.timeout_s()
            seen["group_timeouts"] = _group_timeouts()
            seen["step_started"] = time.monotonic()
            if rank == 1:
                deadline = time.monotonic() + 2 * STALL_S
                while not failed.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
        return train_step(self, images, labels, **kwargs)

    checkpoint.save_state, Trainer.train_step = slow_save, stalling_step
    cfg = load_config(config)
    try:
        with open_trainer(cfg) as trainer:
            trainer.train()
        seen["error"] = None
    except RuntimeError as e:
        seen["failed_after_s"] = time.monotonic() - seen.get("step_started", 0.0)
        seen["error"] = str(e)
        if rank == 0:
            failed.touch()
    Path(f"{out}.{rank}").write_text(json.dumps(seen))


@pytest.mark.distributed
def test_a_stall_in_a_long_timeout_block_waits_and_one_in_a_steady_step_fails_fast(
    synthetic_shards, tmp_path
):
    """2 gloo ranks train with train.step_timeout_s=2 and train.collective_timeout_s=30.
    Rank 0 stalls 4 s inside a checkpoint save at a steady step: rank 1 waits for it in the
    save's collectives (the long timeout) and trains on. Then rank 1 stalls in a steady step:
    rank 0 fails 2-4 s after entering it, with the trainer's message naming
    train.step_timeout_s=2. Measured: 7.7 s (the fork server of tests/dist_helpers.py started)."""
    from tests.dist_helpers import run_distributed

    shards = synthetic_shards(classes=16, test_classes=8, images_per_class=8, samples_per_shard=32)
    cfg = tiny_run_config(
        shards,
        tmp_path / "run",
        sampler={"steps_per_epoch": 6},
        train={
            "epochs": 1,
            "checkpoint_every": CHECKPOINT_STEP,
            "log_every": 1,
            "step_timeout_s": STEP_TIMEOUT_S,
            "collective_timeout_s": LONG_TIMEOUT_S,
            "step_timeout_after": 2,
        },
        tracking={"enabled": False},
    )
    config = write_config(tmp_path / "run.yaml", cfg)
    out = tmp_path / "seen"
    run_distributed(_stalling_run, 2, str(config), str(out), timeout_s=LONG_TIMEOUT_S)
    rank0, rank1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1))
    # The long block: rank 1 waited out rank 0's stall, longer than the step timeout.
    assert rank1["save_s"] >= STALL_S - 0.5, rank1
    assert rank0["timeout_in_step"] == rank1["timeout_in_step"] == STEP_TIMEOUT_S
    # Every group switched, DeepSpeed's gradient group too (its all-reduce waits for a peer).
    assert rank0["group_timeouts"] == [STEP_TIMEOUT_S] * 2, rank0
    # The steady step: rank 0 failed by the step timeout, not the long one.
    assert rank0["error"] is not None, rank0
    assert f"a collective failed at step {STALLED_STEP - 1} (rank 0; " in rank0["error"]
    assert f"train.step_timeout_s={STEP_TIMEOUT_S:g})" in rank0["error"], rank0["error"]
    assert STEP_TIMEOUT_S <= rank0["failed_after_s"] < 2 * STEP_TIMEOUT_S, rank0
    assert rank1["error"] is not None, rank1  # rank 1 learns of it too, it does not hang


def test_the_step_timeout_is_positive_and_at_most_the_long_one():
    with pytest.raises(ConfigError, match=r"train\.step_timeout_s=700: must be > 0 seconds and "):
        TrainConfig(step_timeout_s=700)
    with pytest.raises(ConfigError, match=r"at most train\.collective_timeout_s=60 .*raise"):
        TrainConfig(collective_timeout_s=60)
    with pytest.raises(ConfigError, match=r"train\.step_timeout_s=0: must be > 0"):
        TrainConfig(step_timeout_s=0)
    with pytest.raises(ConfigError, match=r"train\.step_timeout_after=-1: must be >= 0"):
        TrainConfig(step_timeout_after=-1)
    assert TrainConfig(collective_timeout_s=60, step_timeout_s=60).step_timeout_s == 60


def test_the_long_timeout_comes_back_after_its_block_and_stays_after_a_failed_collective(
    monkeypatch,
):
    """No process group: the timeouts in force as the trainer and its hooks read them."""
    monkeypatch.setattr(group, "_long_timeout_s", LONG_TIMEOUT_S)
    monkeypatch.setattr(group, "_timeout_s", LONG_TIMEOUT_S)
    group.set_timeout(STEP_TIMEOUT_S)
    with group.long_timeout():
        assert group.timeout_s() == LONG_TIMEOUT_S
    assert group.timeout_s() == STEP_TIMEOUT_S
    with pytest.raises(ValueError), group.long_timeout():
        raise ValueError("not a collective")
    assert group.timeout_s() == STEP_TIMEOUT_S
    # The group is broken after this: the long timeout stays, the one that ran out.
    with pytest.raises(RuntimeError), group.long_timeout():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer")
    assert group.timeout_s() == LONG_TIMEOUT_S
    group.set_timeout(None)
    assert group.timeout_s() == group.long_timeout_s() == LONG_TIMEOUT_S
