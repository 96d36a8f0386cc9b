"""``Trainer`` in this process (1 rank, no torchrun): a tiny model, tiny synthetic shards, 2
steps; the run directory it leaves (checkpoint with its TrainState, result, weights, logs)."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline import weights
from pipeline.config.load import load_config
from pipeline.config.schema import DataConfig
from pipeline.rundir import RunDir
from pipeline.train import checkpoint, manifest

STEPS = 2


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    return synthetic_shards(classes=8, test_classes=4, images_per_class=8, samples_per_shard=64)


def _config(tiny_config, shards: Path, *extra: str):
    """The tiny run into ``tmp_path/run``, checkpointing and logging every step."""
    path = tiny_config(
        shards,
        sampler={"samples_per_class": 4, "steps_per_epoch": STEPS, "shuffle_buffer_groups": 4},
        train={"epochs": 1, "checkpoint_every": 1, "keep_checkpoints": 1, "log_every": 1},
        eval={"ks": [1, 4], "batch_size": 64},
    )
    return load_config(path, list(extra))


def test_trainer_trains_checkpoints_and_records_the_run(
    shards, tmp_path, tiny_config, single_process
):
    from pipeline.data.transforms import read_weights_scheme
    from pipeline.train.entry import open_trainer, train

    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _config(
        tiny_config, shards, f"tracking.uri={uri}", "tracking.register_model=tiny-embedder"
    )
    result = train(cfg)
    run = RunDir(out)

    assert result["step"] == STEPS and result["resumed_from"] is None
    assert run.read_result() == result
    assert run.weights.is_file() and run.config.is_file() and run.curves.is_file()
    # The weights carry the face crop and the preprocessing they were trained with.
    assert read_weights_scheme(run.weights)["crop"] == {"mode": "none", "size": 0}
    assert run.read_run_id() == result["run_id"]
    assert set(result["metrics"]) >= {"recall@1", "recall@4", "map@r"}
    assert (run.eval / "metrics.json").is_file()

    # The last checkpoint is the final step, and its client state is a TrainState.
    assert weights.latest_tag(run.checkpoints) == checkpoint.tag_for(STEPS)
    file = weights.model_states_file(run.checkpoints)
    state = checkpoint.TrainState.from_client_state(weights.read_client_state(file), file)
    assert (state.step, state.epoch, state.step_in_epoch) == (STEPS, 1, 0)
    assert state.world_size == 1 and state.mlflow_run_id == result["run_id"]
    assert state.architecture == {
        "backbone": "test_byobnet",
        "feature_dim": 256,
        "embedding_dim": 16,
    }

    # Every step logged, with a finite loss: to MLflow and to this rank's log file.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    losses = sorted(
        (m.step, m.value) for m in client.get_metric_history(result["run_id"], "train/loss")
    )
    assert [s for s, _ in losses] == [1, 2] and all(math.isfinite(v) for _, v in losses)
    retries = client.get_metric_history(result["run_id"], "data/read_retries")
    assert sorted((m.step, m.value) for m in retries) == [(1, 0.0), (2, 0.0)]  # local shards
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    # The run's model, registered under tracking.register_model: version 1 comes
    # from this run and embeds images as the saved weights do.
    versions = client.search_model_versions("name='tiny-embedder'")
    assert [(int(v.version), v.run_id) for v in versions] == [(1, result["run_id"])]
    _registered_model_embeds_like_the_weights(uri, run.weights, cfg.data)
    log = run.log_file(0).read_text()
    for step in range(1, STEPS + 1):
        assert f"step {step}/{STEPS}: loss " in log
    assert f"step {STEPS}/{STEPS}: " in log and ", 0 read retries" in log
    assert "final evaluation at step 2" in log

    # The same run again: nothing to train, the recorded result.
    with open_trainer(cfg) as again:
        assert again.done and again.step == STEPS
        assert again.train() == result

    # A run folder from before mlflow_run.txt recorded its MLflow run in its checkpoints
    # only: resumed, it continues that run, recorded now where the tracking session looks.
    old = RunDir(tmp_path / "old")
    shutil.copytree(run.checkpoints, old.checkpoints)
    assert old.read_run_id() is None
    resumed = train(replace(cfg, train=replace(cfg.train, output_dir=str(old.root))))
    assert resumed["resumed_from"] == STEPS and resumed["run_id"] == result["run_id"]
    assert old.read_run_id() == result["run_id"]
    assert len(client.search_runs([client.get_run(result["run_id"]).info.experiment_id])) == 1

    # A checkpoint whose weights went NaN (a diverged run can checkpoint between two logged
    # losses) is refused when resumed, in one line, before any step.
    nan = RunDir(tmp_path / "nan")
    shutil.copytree(run.checkpoints, nan.checkpoints)
    tag = nan.checkpoints / checkpoint.tag_for(STEPS)
    states = torch.load(tag / weights.MODEL_STATES, map_location="cpu", weights_only=True)
    first = next(k for k, v in states["module"].items() if v.is_floating_point())
    states["module"][first].view(-1)[0] = float("nan")
    torch.save(states, tag / weights.MODEL_STATES)
    manifest.write(tag)  # the file is whole: only its values are wrong
    with pytest.raises(weights.ModelLoadError, match=rf"checkpoint {tag} holds NaN or infinite"):
        train(replace(cfg, train=replace(cfg.train, output_dir=str(nan.root))))


def test_train_step_returns_the_local_loss(shards, tmp_path, tiny_config, single_process):
    from pipeline.train.entry import open_trainer

    with open_trainer(_config(tiny_config, shards, "tracking.enabled=false")) as trainer:
        images, labels = next(trainer._batches())
        phases = []
        loss = trainer.train_step(images, labels, on_phase=phases.append)
    assert loss.ndim == 0 and torch.isfinite(loss) and 0 <= float(loss) <= 1
    assert trainer.step == 1 and phases == ["forward", "loss", "backward", "optimizer"]
    assert not (tmp_path / "run" / "checkpoints").exists()  # a checkpoint is the loop's hook


def _registered_model_embeds_like_the_weights(uri: str, weights: Path, data: DataConfig) -> None:
    import io

    import mlflow
    import numpy as np
    import pandas as pd
    from PIL import Image

    from pipeline.data.transforms import eval_transform
    from pipeline.model import load_trained_model

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    encoded = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    mlflow.set_tracking_uri(uri)
    try:
        got = mlflow.pyfunc.load_model("models:/tiny-embedder/1").predict(
            pd.DataFrame({"image": encoded})
        )
    finally:
        mlflow.set_tracking_uri(None)
    transform = eval_transform(data)
    model = load_trained_model(weights).eval()
    with torch.no_grad():
        want = model(torch.stack([transform(Image.fromarray(a)) for a in images])).numpy()
    assert np.abs(np.asarray(got) - want).max() < 1e-5
