"""A finished run stays finished: rerunning ``pipeline train`` on its folder returns the recorded
result or is refused in one line, training on happens only on purpose (``train.init_weights``
in a new folder, ``train.continue_finished`` in place), the finished model's checkpoint is never
rotated away, and ``pipeline evaluate`` never replaces the run's own evaluation.

One real DeepSpeed run in this process (tiny model, 2 steps, a checkpoint every step, one
kept) is trained once for the module and read by every test; a test that trains on copies it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import logs
from pipeline.config.load import load_config
from pipeline.rundir import RunDir
from pipeline.train import checkpoint, manifest
from pipeline.train.finished import FinishedRunError, training_changes
from pipeline.weights import MODEL_STATES, ModelLoadError, latest_tag, read_state_dict
from tests.tiny import tiny_run_config, write_config

STEPS = 2


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    # The shards tests/test_trainer.py reads: written once per session.
    return synthetic_shards(classes=8, test_classes=4, images_per_class=8, samples_per_shard=64)


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory, single_process) -> tuple[Path, RunDir, dict]:
    """The run config's file, the run folder trained to its end, and its result."""
    from pipeline.train.entry import train

    root = tmp_path_factory.mktemp("finished")
    cfg = tiny_run_config(
        shards,
        root / "run",
        sampler={"samples_per_class": 4, "steps_per_epoch": STEPS, "shuffle_buffer_groups": 4},
        train={"epochs": 1, "checkpoint_every": 1, "keep_checkpoints": 1, "log_every": 1},
        eval={"ks": [1, 4], "batch_size": 64},
        tracking={"enabled": False},
    )
    path = write_config(root / "run.yaml", cfg)
    result = train(load_config(path))
    assert result["step"] == STEPS
    return path, RunDir(root / "run"), result


def _snapshot(run: RunDir) -> dict[str, tuple[str, int]]:
    """SHA-256 and mtime of the run's weights, result, config, checkpoints and evaluation."""
    files = [run.weights, run.result, run.config, *run.checkpoints.rglob("*"), *run.eval.rglob("*")]
    return {
        str(p.relative_to(run.root)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in files
        if p.is_file()
    }


def _copy(run: RunDir, to: Path) -> RunDir:
    shutil.copytree(run.root, to)
    (to / RunDir(to).lock.name).unlink(missing_ok=True)
    return RunDir(to)


def test_a_finished_run_asked_to_train_more_or_differently_is_refused(finished, capsys):
    from pipeline.cli import main
    from pipeline.train.entry import train

    path, run, _ = finished
    before = _snapshot(run)
    # The CLI: one line naming each key as old -> new and both ways to train on on purpose.
    code = main(["train", "--config", str(path), "sampler.steps_per_epoch=4", "optim.lr=0.001"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "holds a finished run (result.json, step 2)" in err
    assert "optim.lr: 1e-05 -> 0.001; sampler.steps_per_epoch: 2 -> 4" in err
    assert f"train.init_weights={run.weights}" in err and "train.continue_finished=true" in err
    # More epochs, another loss: refused the same way.
    for override, shown in [
        ("train.epochs=3", "train.epochs: 1 -> 3"),
        ("loss.temperature=0.05", "loss.temperature: 0.01 -> 0.05"),
    ]:
        with pytest.raises(FinishedRunError, match=re.escape(f"differently: {shown}; a finished")):
            train(load_config(path, [override]))
    # continue_finished allows more steps only: a changed learning rate is still refused.
    with pytest.raises(
        FinishedRunError, match=r"optim.lr: 1e-05 -> 0.01; .*allows only more steps"
    ):
        train(
            load_config(path, ["train.continue_finished=true", "train.epochs=2", "optim.lr=0.01"])
        )
    assert _snapshot(run) == before


def test_a_finished_run_rerun_with_its_config_returns_the_result_and_writes_nothing(finished):
    from pipeline.train.entry import train

    path, run, result = finished
    before = _snapshot(run)
    # Keys that do not change what trains: cadences, retention, evaluation, threads, MLflow.
    same = ["train.log_every=5", "train.keep_checkpoints=3", "train.checkpoint_every=7"]
    same += ["eval.ks=[1]", "data.num_workers=1", "train.collective_timeout_s=900"]
    same += ["train.step_timeout_s=50", "train.step_timeout_after=3"]
    assert train(load_config(path, same)) == result
    assert _snapshot(run) == before


def test_a_moved_catalog_is_the_same_data_and_a_rewritten_one_is_not(finished, shards, tmp_path):
    from pipeline.train.entry import train

    path, run, result = finished
    before = _snapshot(run)
    moved = tmp_path / "elsewhere"
    shutil.copytree(shards, moved)
    cfg = tiny_run_config(moved, run.root, **_sections(path))
    assert train(load_config(write_config(tmp_path / "moved.yaml", cfg))) == result
    assert _snapshot(run) == before
    # The same location with other content is other data.
    sizes = moved / "train" / "sizes.json"
    sizes.write_text(sizes.read_text() + "\n")
    with pytest.raises(
        FinishedRunError,
        match=r"data.train.0.urls: .*/train \(catalog [0-9a-f]{12}\) -> .*elsewhere/train \(catalog [0-9a-f]{12}\)",
    ):
        train(load_config(tmp_path / "moved.yaml"))


def _sections(path: Path) -> dict:
    import yaml

    cfg = yaml.safe_load(path.read_text())
    return {k: v for k, v in cfg.items() if k != "data"}


@pytest.mark.slow  # trains 2 more steps, logged to the session's MLflow server
@pytest.mark.mlflow_server
def test_continue_finished_trains_on_in_place_and_keeps_the_final_checkpoint(
    finished, tmp_path, mlflow_server
):
    from mlflow import MlflowClient

    from pipeline.train.entry import train

    path, reference, _ = finished
    run = _copy(reference, tmp_path / "run")
    final = checkpoint.tag_for(STEPS)
    assert checkpoint.final_tags(run.checkpoints) == [final]
    uri = mlflow_server.url
    more = [f"train.output_dir={run.root}", "train.epochs=2", "train.continue_finished=true"]
    tracking = ["tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=continued"]
    result = train(load_config(path, [*more, *tracking]))

    assert result["step"] == 2 * STEPS and result["resumed_from"] == STEPS
    assert run.read_result() == result
    # keep_checkpoints=1 rotated step 3 away, never the finished model's step 2.
    tags = sorted(p.name for p in run.checkpoints.glob("step_*"))
    assert tags == [final, checkpoint.tag_for(2 * STEPS)]
    assert latest_tag(run.checkpoints) == checkpoint.tag_for(2 * STEPS)
    assert checkpoint.final_tags(run.checkpoints) == tags
    assert manifest.verify(run.checkpoints / final) is None
    kept, original = (
        run.checkpoints / final / MODEL_STATES,
        reference.checkpoints / final / MODEL_STATES,
    )
    assert kept.read_bytes() == original.read_bytes()
    tags_logged = MlflowClient(tracking_uri=uri).get_run(result["run_id"]).data.tags
    assert tags_logged["continued_from_step"] == str(STEPS)
    # Continued to its new end, the run is finished again: the same config is its result.
    assert train(load_config(path, [*more, "tracking.enabled=false"])) == result


def test_init_weights_starts_a_new_run_from_the_finished_model(finished, tmp_path):
    from pipeline.train.entry import open_trainer

    path, run, _ = finished
    new = [f"train.output_dir={tmp_path / 'new'}", f"train.init_weights={run.weights}"]
    with open_trainer(load_config(path, [*new, "optim.lr=0.001"])) as trainer:
        assert trainer.step == 0 and not trainer.done
        got = trainer.engine.module.state_dict()
    want, _ = read_state_dict(run.weights)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name].float(), tensor), name
    with pytest.raises(
        ModelLoadError,
        match=r"train.init_weights=.*holds a model with .*'embedding_dim': 16.*'embedding_dim': 8",
    ):
        open_trainer(load_config(path, [*new, "model.embedding_dim=8"])).__enter__()


def test_an_unfinished_run_resumes_with_a_warning_naming_changed_keys(
    finished, shards, tmp_path, caplog
):
    from pipeline.train.entry import open_trainer

    path, reference, _ = finished
    run = _copy(reference, tmp_path / "run")
    run.result.unlink()  # interrupted before its result was written
    # Its shards moved meanwhile: the same data, so not named.
    moved = tmp_path / "elsewhere"
    shutil.copytree(shards, moved)
    config = write_config(
        tmp_path / "moved.yaml", tiny_run_config(moved, run.root, **_sections(path))
    )
    logging.getLogger(logs.LOGGER).addHandler(caplog.handler)
    try:
        cfg = load_config(config, [f"train.output_dir={run.root}", "optim.lr=0.001"])
        with open_trainer(cfg) as trainer:
            assert trainer.step == STEPS and not trainer.done
    finally:
        logging.getLogger(logs.LOGGER).removeHandler(caplog.handler)
    (warning,) = [
        r.getMessage() for r in caplog.records if "differs from the one" in r.getMessage()
    ]
    assert "from the one it was trained with: optim.lr: 1e-05 -> 0.001. The run" in warning
    assert "train.init_weights=" in warning


def test_the_global_batch_is_compared_across_world_sizes(finished):
    path, run, _ = finished
    # 2 ranks x 2 classes is the 1 rank x 4 classes the run trained with.
    halved = load_config(path, ["sampler.classes_per_batch=2"])
    assert training_changes(run, halved, world=2, saved_world=1) == []
    (change,) = training_changes(run, halved, world=1, saved_world=1)
    assert str(change) == "sampler.classes_per_batch x ranks: 4 -> 2"


def test_rotation_never_removes_a_finished_models_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
        (root / "latest").write_text(checkpoint.tag_for(step))
        if step == 2:
            checkpoint.mark_final(root, step)
        checkpoint.prune(root, keep=1)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        checkpoint.tag_for(2),
        checkpoint.tag_for(5),
    ]


def test_evaluate_writes_its_own_folder_never_the_runs_evaluation(finished, capsys):
    from pipeline.cli import main

    _, run, _ = finished
    before = _snapshot(run)
    args = ["evaluate", "--config", str(run.config), "--weights", str(run.weights)]
    assert main([*args, "tracking.enabled=false"]) == 0
    assert _snapshot(run) == before  # eval/ byte for byte, and nothing else of the run
    (folder,) = run.evaluations.iterdir()
    assert (folder / "metrics.json").is_file() and (folder / "embeddings.npy").is_file()
    capsys.readouterr()
    assert main([*args, "--out", str(run.eval), "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is the evaluation folder of the training run" in err
    assert "--force" in err and _snapshot(run) == before


def test_evaluate_folder_is_the_weights_runs_and_force_allows_its_own(finished, tmp_path):
    from datetime import datetime, timezone

    from pipeline.eval.destination import EvalOutputError, evaluation_folder

    path, run, _ = finished
    tag = run.checkpoints / checkpoint.tag_for(STEPS)
    for weights in (run.weights, run.checkpoints, tag):
        assert RunDir.holding(weights).root == run.root.resolve()
    assert RunDir.holding(tmp_path / "w.safetensors") is None
    # Another config's train.output_dir does not decide where the run's weights are evaluated.
    cfg = load_config(path, [f"train.output_dir={tmp_path / 'other'}"])
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    got = evaluation_folder(cfg, str(tag), now=now)
    assert got == run.root.resolve() / "evaluations" / "20260102-030405"
    # The run's own evaluation folder, as --out or as eval.output_dir: refused, unless forced.
    with pytest.raises(EvalOutputError, match=r"^--out .* is the evaluation folder of"):
        evaluation_folder(cfg, str(run.weights), str(run.eval))
    own = load_config(path, [f"eval.output_dir={run.eval}"])
    with pytest.raises(EvalOutputError, match=r"^eval.output_dir=.* pass --out DIR elsewhere"):
        evaluation_folder(own, str(run.weights))
    assert evaluation_folder(cfg, str(run.weights), str(run.eval), force=True) == run.eval
