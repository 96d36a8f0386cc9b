"""A loss that keeps state across steps (pipeline.loss.LossState) through the real trainer and
real DeepSpeed checkpoints, in 2 gloo processes and then 1: its state is saved with each
checkpoint, restored on resume and advanced by every step; a global state resumes on another
world size, a per-rank one is refused there with a one-line error.

The losses are Smooth-AP plus a small state written here: a step counter and an exponential
moving average of the global batch's mean label (global: every rank computes it from the
gathered labels), or each rank's running sum of its own labels (per rank). The expected states
are recomputed in the test, in float64, from the labels each rank recorded at every step.

Cost: about 60 s on the shared 2-core machine (four 2-rank or 1-rank runs of 4 steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.distributed import collectives
from pipeline.loss import LossState, SmoothAPLoss, loss_state
from pipeline.train.checkpoint import LOSS_STATE, CheckpointError, loss_state_file, tag_for
from tests.dist_helpers import run_distributed
from tests.tiny import tiny_run_config, write_config

pytestmark = pytest.mark.distributed

STEPS = 4  # per epoch; checkpoints every 2 steps
EMA = 0.5


class GlobalMemory(SmoothAPLoss):
    """Smooth-AP with a state identical on every rank (built from gathered labels)."""

    global_state = True

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("ema", torch.zeros((), dtype=torch.float64))
        self.seen: list[list[int]] = []  # this rank's labels per step (not state)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # All ranks participate (the loss and this gather).
        self._batch = collectives.all_gather_nograd(labels)
        self.seen.append(labels.tolist())
        return super().forward(embeddings, labels)

    def after_step(self, step: int) -> None:
        assert step == int(self.steps) + 1, f"step {step} after {int(self.steps)} steps"
        self.steps += 1
        self.ema.mul_(EMA).add_((1 - EMA) * self._batch.double().mean())


class PerRankMemory(GlobalMemory):
    """The same, plus each rank's own running sum of its labels: a per-rank state."""

    global_state = False

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("label_sum", torch.zeros((), dtype=torch.int64))

    def after_step(self, step: int) -> None:
        super().after_step(step)
        self.label_sum += int(sum(self.seen[-1]))


def _config(shards: Path, run: Path, epochs: int) -> str:
    cfg = tiny_run_config(
        shards,
        run,
        sampler={"classes_per_batch": 2, "samples_per_class": 2, "steps_per_epoch": STEPS},
        # The second epoch trains the finished first one on, in place, on purpose.
        train={
            "epochs": epochs,
            "checkpoint_every": 2,
            "keep_checkpoints": 3,
            "log_every": 2,
            "continue_finished": epochs > 1,
        },
        eval={"ks": [1], "batch_size": 64},
        tracking={"enabled": False},
    )
    return str(write_config(run.parent / f"{run.name}-{epochs}.yaml", cfg))


def _state(loss: torch.nn.Module) -> dict:
    return {k: v.item() for k, v in loss.state_dict().items()}


def _train(rank: int, world: int, config: str, loss_cls: str, out: str) -> None:
    """Plan, build, swap in the stateful loss, train; records the state right after the
    resume, the state at the end and the labels this rank saw, in ``out``-rank<R>.json."""
    from pipeline.config.load import load_config
    from pipeline.rundir import RunDir
    from pipeline.train import runlock
    from pipeline.train.build import build_components
    from pipeline.train.plan import plan_run
    from pipeline.train.trainer import Trainer

    cfg = load_config(config, [])
    with runlock.held(RunDir.of(cfg)):
        plan = plan_run(cfg, world)
        cfg = plan.apply(cfg)
        parts = build_components(cfg, plan)
        parts.loss = globals()[loss_cls]().to(parts.engine.device)
        with Trainer(cfg, plan, parts) as trainer:
            assert loss_state(trainer.loss_fn) is parts.loss
            resumed = {"step": trainer.step, **_state(parts.loss)}
            trainer.train()
    record = {"resumed": resumed, "end": _state(parts.loss), "seen": parts.loss.seen}
    Path(f"{out}-rank{rank}.json").write_text(json.dumps(record))


def _refused(rank: int, world: int, config: str, out: str) -> None:
    """A per-rank state on another world size, and a stateful checkpoint under a stateless
    loss: both refused before training, in one line."""
    from pipeline.config.load import load_config
    from pipeline.rundir import RunDir
    from pipeline.train import runlock
    from pipeline.train.build import build_components
    from pipeline.train.plan import plan_run
    from pipeline.train.trainer import Trainer

    cfg = load_config(config, [])
    with runlock.held(RunDir.of(cfg)):
        plan = plan_run(cfg, world)
        cfg = plan.apply(cfg)
        parts = build_components(cfg, plan)
        stateless = parts.loss
        parts.loss = PerRankMemory()
        per_rank = r"keeps a state per rank, saved by 2 ranks, which does not resume on 1 ranks"
        with pytest.raises(CheckpointError, match=per_rank):
            Trainer(cfg, plan, parts)
        parts.loss = stateless
        with pytest.raises(CheckpointError, match=r"holds a loss state .* keeps none"):
            Trainer(cfg, plan, parts)
    Path(f"{out}-rank{rank}.json").write_text(json.dumps({"refused": True}))


def _read(out: Path, world: int) -> list[dict]:
    return [json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in range(world)]


def _expected(seen_by_rank: list[list[list[int]]], start: float = 0.0) -> list[float]:
    """The EMA after each step, from every rank's labels (float64, step by step)."""
    ema, out = start, []
    for step_labels in zip(*seen_by_rank, strict=True):
        labels = [x for rank_labels in step_labels for x in rank_labels]
        ema = EMA * ema + (1 - EMA) * sum(labels) / len(labels)
        out.append(ema)
    return out


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    return synthetic_shards(classes=16, test_classes=8, images_per_class=8, samples_per_shard=32)


def _saved(run: Path, step: int, name: str) -> dict:
    state = torch.load(run / "checkpoints" / tag_for(step) / name, weights_only=True)
    return {k: v.item() for k, v in state.items()}


def test_a_global_loss_state_is_saved_once_and_resumes_on_another_world_size(shards, tmp_path):
    assert isinstance(GlobalMemory(), LossState) and loss_state(SmoothAPLoss()) is None
    run, out = tmp_path / "global", tmp_path / "out"
    out.mkdir()
    run_distributed(_train, 2, _config(shards, run, 1), "GlobalMemory", str(out / "a"))
    first = _read(out / "a", 2)
    emas = _expected([r["seen"] for r in first])
    assert first[0]["end"] == first[1]["end"]  # one state on every rank
    assert first[0]["end"]["steps"] == STEPS
    assert first[0]["end"]["ema"] == pytest.approx(emas[-1], rel=1e-12)
    # Saved once, by rank 0, with each checkpoint.
    folder = run / "checkpoints" / tag_for(2)
    assert sorted(p.name for p in folder.glob("loss_state*")) == [LOSS_STATE]
    assert _saved(run, 2, LOSS_STATE) == {"steps": 2, "ema": pytest.approx(emas[1], rel=1e-12)}

    # One rank, one more epoch: the state comes back and every step advances it.
    run_distributed(_train, 1, _config(shards, run, 2), "GlobalMemory", str(out / "b"))
    (second,) = _read(out / "b", 1)
    assert second["resumed"] == {"step": STEPS, **first[0]["end"]}
    assert second["end"]["steps"] == 2 * STEPS
    assert second["end"]["ema"] == pytest.approx(
        _expected([second["seen"]], first[0]["end"]["ema"])[-1], rel=1e-12
    )


@pytest.mark.slow  # three DeepSpeed runs; the global state's test keeps the fast tier's check
def test_a_per_rank_loss_state_resumes_on_its_world_size_only(shards, tmp_path):
    run, out = tmp_path / "per_rank", tmp_path / "out"
    out.mkdir()
    run_distributed(_train, 2, _config(shards, run, 1), "PerRankMemory", str(out / "a"))
    first = _read(out / "a", 2)
    for rank, record in enumerate(first):
        own = sum(sum(labels) for labels in record["seen"])
        assert record["end"]["label_sum"] == own
        assert _saved(run, STEPS, loss_state_file(rank)) == record["end"]
    assert first[0]["end"]["label_sum"] != first[1]["end"]["label_sum"]
    assert not (run / "checkpoints" / tag_for(STEPS) / LOSS_STATE).exists()

    run_distributed(_refused, 1, _config(shards, run, 2), str(out / "refused"))
    assert _read(out / "refused", 1) == [{"refused": True}]

    # The same world size: each rank gets its own part back.
    run_distributed(_train, 2, _config(shards, run, 2), "PerRankMemory", str(out / "b"))
    second = _read(out / "b", 2)
    for rank in (0, 1):
        assert second[rank]["resumed"] == {"step": STEPS, **first[rank]["end"]}
        extra = sum(sum(labels) for labels in second[rank]["seen"])
        assert second[rank]["end"]["label_sum"] == first[rank]["end"]["label_sum"] + extra
        assert second[rank]["end"]["steps"] == 2 * STEPS
