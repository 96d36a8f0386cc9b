"""End to end: `pipeline train` in 2 real gloo processes, killed with SIGKILL after a
checkpoint, resumed by the same command; it continues the same MLflow run, logs each step
once, and ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import free_port
from tests.tiny import tiny_run_config, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 16  # 2 epochs x 8
CHECKPOINT_EVERY = 3


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    return synthetic_shards(classes=16, test_classes=8, images_per_class=8, samples_per_shard=32)


def _config(tmp: Path, shards: Path, name: str) -> Path:
    cfg = tiny_run_config(
        shards,
        tmp / name,
        sampler={"samples_per_class": 4, "steps_per_epoch": 8},
        optim={"lr": 1e-3, "scheduler": "step", "step_size": 5, "gamma": 0.5},
        loss={"temperature": 0.05},
        train={
            "epochs": 2,
            "checkpoint_every": CHECKPOINT_EVERY,
            "keep_checkpoints": 2,
            "log_every": 1,
            "deterministic": True,
            "chunk_size": 6,  # the gradient cache on the way
        },
        eval={"every": 8, "ks": [1, 4], "batch_size": 64},
        tracking={"uri": f"sqlite:///{tmp / name / 'mlflow.db'}", "experiment": "resume"},
    )
    return write_config(tmp / f"{name}.yaml", cfg)


def _launch(config: Path, log: Path) -> list[subprocess.Popen]:
    """Both ranks in one new process group (SIGKILL to the group = a node dies)."""
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    try:
        for rank in (0, 1):
            env = dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                OMP_NUM_THREADS="1",
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config)],
                    env=env,
                    stdout=open(f"{log}.rank{rank}", "w"),  # noqa: SIM115 (closed at exit)
                    stderr=subprocess.STDOUT,
                    process_group=procs[0].pid if procs else 0,
                )
            )
    except BaseException:
        _kill(procs)
        raise
    return procs


def _kill(procs: list[subprocess.Popen]) -> None:
    if procs:
        os.killpg(procs[0].pid, signal.SIGKILL)
        for p in procs:
            p.wait()


def _wait(procs: list[subprocess.Popen], log: Path, timeout: float = 240) -> None:
    """Wait for both ranks; a failed or hung rank fails the test (and the other is killed,
    since it would wait for its peer forever)."""
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs):
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or time.time() > deadline:
            _kill(procs)
            rank = failed[0] if failed else 0
            tail = Path(f"{log}.rank{rank}").read_text()[-3000:]
            pytest.fail(f"rank {rank} failed or timed out:\n{tail}")
        time.sleep(0.2)
    for rank, p in enumerate(procs):
        if p.returncode != 0:
            pytest.fail(
                f"rank {rank} exited with {p.returncode}:\n{Path(f'{log}.rank{rank}').read_text()[-3000:]}"
            )


def _history(uri: str, key: str = "train/loss") -> tuple[list, list]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("resume")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    points = [
        (m.step, m.value) for r in runs for m in client.get_metric_history(r.info.run_id, key)
    ]
    return runs, sorted(points)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path, shards):
    # The uninterrupted reference.
    ref_cfg = _config(tmp_path, shards, "ref")
    _wait(_launch(ref_cfg, tmp_path / "ref.log"), tmp_path / "ref.log")
    ref_out = tmp_path / "ref"
    ref_uri = f"sqlite:///{ref_out / 'mlflow.db'}"

    # The interrupted run: killed once a checkpoint exists and a later step has been logged,
    # so that the resumed job recomputes steps that MLflow already holds.
    cfg = _config(tmp_path, shards, "run")
    out = tmp_path / "run"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    log = tmp_path / "run.log"
    procs = _launch(cfg, log)
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and killed_at is None:
        latest = out / "checkpoints" / "latest"
        if latest.is_file() and (out / "mlflow_run.txt").is_file():
            saved = int(latest.read_text().strip().split("_")[1])
            _, points = _history(uri)
            if points and points[-1][0] > saved:
                os.killpg(procs[0].pid, signal.SIGKILL)
                killed_at = (saved, points[-1][0])
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    if killed_at is None:
        _kill(procs)
    for p in procs:
        p.wait(timeout=30)
    assert killed_at is not None, f"not killed in time:\n{Path(f'{log}.rank0').read_text()[-3000:]}"
    assert all(p.returncode == -signal.SIGKILL for p in procs)
    saved, _ = killed_at
    assert saved < STEPS and not (out / "result.json").exists()

    # The same command again resumes and finishes.
    _wait(_launch(cfg, tmp_path / "resume.log"), tmp_path / "resume.log")
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == STEPS
    assert result["resumed_from"] is not None and result["resumed_from"] >= saved
    resume_log = Path(f"{tmp_path / 'resume.log'}.rank0").read_text()
    assert f"resumed at step {result['resumed_from']}" in resume_log

    # Same final weights, bitwise (deterministic CPU run).
    ref_w, got_w = _weights(ref_out / "model.safetensors"), _weights(out / "model.safetensors")
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], got_w[k]), k
    ref_result = json.loads((ref_out / "result.json").read_text())
    assert result["metrics"] == ref_result["metrics"]

    # One MLflow run, continued; every step logged exactly once, with the reference's values.
    runs, points = _history(uri)
    assert len(runs) == 1 and runs[0].info.run_id == result["run_id"]
    assert runs[0].info.status == "FINISHED"
    assert [s for s, _ in points] == list(range(1, STEPS + 1))
    _, ref_points = _history(ref_uri)
    assert points == ref_points
    _, evals = _history(uri, "eval/map_at_r")
    _, ref_evals = _history(ref_uri, "eval/map_at_r")
    assert [s for s, _ in evals] == [8, STEPS] and evals == ref_evals
    # Artifacts: the resolved config, curves, final weights, evaluation files.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    names = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"config.yaml", "model.safetensors", "plots", "eval"} <= names
    # keep_checkpoints=2: the two newest remain; the last one is the final step.
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert len(tags) == 2 and tags[-1] == f"step_{STEPS:08d}"

    # The same command on a finished run returns the recorded result without training.
    _wait(_launch(cfg, tmp_path / "again.log"), tmp_path / "again.log")
    assert "already trained" in Path(f"{tmp_path / 'again.log'}.rank0").read_text()
    assert json.loads((out / "result.json").read_text()) == result
