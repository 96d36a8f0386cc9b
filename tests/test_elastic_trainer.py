"""Elastic resume through the real trainer: a run trained by 2 ranks
(torchrun) continues in 1 process, and (ZeRO 2) one trained by 1 process continues on 2 ranks.

Each run is ``pipeline.train.entry.train`` as ``pipeline train`` calls it, launched by this
module as a script (``python -m tests.test_elastic_trainer CONFIG STATE_DIR KEY=VALUE...``)
so that it can also record ``elastic.full_state`` of the engine right after the resume and at
the end. The stop is deterministic: the first run's config has fewer epochs, the next one more
(the same output directory; its last checkpoint is the one resumed).

Cost: `pytest tests/test_elastic_trainer.py` took 232 s on the shared 2-core machine (load ~10).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

STEPS_PER_EPOCH = 2
K = 2
P_ON_2 = 4  # classes per rank on 2 ranks: a global batch of 2 x 4 x 2 = 16 images


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    # The session's shards of these sizes (tests/conftest.py): read only.
    return synthetic_shards(classes=16, test_classes=8, images_per_class=8, samples_per_shard=32)


def _config(tmp: Path, shards: Path, zero: int, classes_per_batch: int) -> Path:
    cfg = {
        "data": {
            "train": [{"name": "synthetic", "urls": str(shards / "train")}],
            "eval_urls": str(shards / "test"),
            "image_size": 32,
            "resize_size": 32,
            "num_workers": 0,
        },
        "sampler": {
            "classes_per_batch": classes_per_batch,
            "samples_per_class": K,
            "steps_per_epoch": STEPS_PER_EPOCH,
        },
        "model": {"backbone": "test_byobnet", "embedding_dim": 16, "freeze_bn": True},
        "optim": {"lr": 1e-3},
        "train": {
            "output_dir": str(tmp / "run"),
            "epochs": 1,
            "checkpoint_every": STEPS_PER_EPOCH,
            "log_every": 1,
            "deterministic": True,
            "zero_stage": zero,
        },
        "eval": {"batch_size": 16, "ks": [1, 2]},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "elastic"},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, states: Path, ranks: int, epochs: int) -> str:
    """One run on ``ranks`` processes (torchrun for 2, a plain process for 1); returns rank
    0's log of this run."""
    states.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p
    )
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [*launcher, "-m", "tests.test_elastic_trainer", str(config), str(states)]
    # Each launch after the first trains the finished run on to more epochs: on purpose.
    more = [f"train.epochs={epochs}", "train.continue_finished=true"]
    proc = subprocess.run([*command, *more], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stderr


def _resumed_exactly(before: Path, after: Path) -> None:
    from pipeline.train import elastic
    from pipeline.train.safe_load import safe_load

    saved = safe_load(before / "end.pt")
    resumed = safe_load(after / "resumed.pt")
    assert saved["optimizer"] and saved["global_steps"] > 0
    assert not elastic.state_differences(saved, resumed)
    # Not vacuous: the state moved on after the resume.
    assert elastic.state_differences(resumed, safe_load(after / "end.pt"))


def _history(tmp: Path) -> tuple[list, list[int]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("elastic").experiment_id])
    steps = sorted(
        m.step for r in runs for m in client.get_metric_history(r.info.run_id, "train/loss")
    )
    return runs, steps


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("zero", [0, 2])
def test_two_ranks_resume_in_one_process_and_back(tmp_path, shards, zero):
    """2 ranks (torchrun, P=4 per rank) train epoch 1 and checkpoint; the same output
    directory continues in 1 process for epoch 2 (P=8: the global batch of 16 is kept), and
    with ZeRO 2 again on 2 ranks for epoch 3 (P back to 4).

    Asserted per resume: the log says P changed and why; the run trains with the same global
    batch; the engine's state right after the resume (fp32 masters, Adam moments and step per
    parameter, parameter groups, LR schedule, DeepSpeed's step counter) equals, exactly, the
    state that wrote the checkpoint; training completes (result at the last step, resumed from
    the checkpoint's); one MLflow run holds every step once, FINISHED. Measured on the shared
    2-core machine (load ~10-15): ZeRO 0 75 s (2 launches), ZeRO 2 94-149 s (3 launches);
    each launch is mostly imports and DeepSpeed's start-up."""
    config = _config(tmp_path, shards, zero, P_ON_2)
    run = tmp_path / "run"
    _train(config, tmp_path / "a", ranks=2, epochs=1)
    assert json.loads((run / "result.json").read_text())["step"] == STEPS_PER_EPOCH

    log = _train(config, tmp_path / "b", ranks=1, epochs=2)
    tag = f"step_{STEPS_PER_EPOCH:08d}"
    assert f"resuming {tag} on 1 ranks: sampler.classes_per_batch {P_ON_2} -> {2 * P_ON_2}" in log
    assert "1 ranks x 16 images" in log
    _resumed_exactly(tmp_path / "a", tmp_path / "b")
    result = json.loads((run / "result.json").read_text())
    assert (result["step"], result["resumed_from"]) == (2 * STEPS_PER_EPOCH, STEPS_PER_EPOCH)
    runs, steps = _history(tmp_path)
    assert len(runs) == 1 and result["run_id"] == runs[0].info.run_id
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))

    if zero == 2:  # one process's checkpoint, back on 2 ranks
        log = _train(config, tmp_path / "c", ranks=2, epochs=3)
        tag = f"step_{2 * STEPS_PER_EPOCH:08d}"
        # The config's P=4 is already the checkpoint's global batch over 2 ranks: no change.
        assert "sampler.classes_per_batch" not in log
        assert "2 ranks x 8 images" in log
        _resumed_exactly(tmp_path / "b", tmp_path / "c")
        result = json.loads((run / "result.json").read_text())
        assert (result["step"], result["resumed_from"]) == (
            3 * STEPS_PER_EPOCH,
            2 * STEPS_PER_EPOCH,
        )
        runs, steps = _history(tmp_path)
        assert len(runs) == 1 and result["run_id"] == runs[0].info.run_id
        assert steps == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert runs[0].info.status == "FINISHED"


# ---------------------------------------------------------------------------- the run itself


def main(config: str, states: str, overrides: list[str]) -> None:
    """``pipeline.train.entry.train``, plus rank 0 saving ``elastic.full_state`` right
    after the resume (``resumed.pt``) and at the end (``end.pt``)."""
    from pipeline import logs
    from pipeline.config.load import load_config
    from pipeline.distributed import group
    from pipeline.rundir import RunDir
    from pipeline.train import elastic
    from pipeline.train.entry import open_trainer

    cfg = load_config(config, overrides)
    with group.process_group(timeout_s=cfg.train.collective_timeout_s):
        rank = group.process_rank()
        logs.setup_logging(RunDir.of(cfg).log_file(rank), rank=rank)
        with open_trainer(cfg) as trainer:
            for name, when in (("resumed.pt", "start"), ("end.pt", "end")):
                if when == "end":
                    trainer.train()
                state = elastic.full_state(trainer.engine)  # all ranks participate
                if group.is_main_process():
                    torch.save(state, Path(states) / name)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
