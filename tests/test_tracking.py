"""MLflow tracking against a real SQLite store, read back from a separate process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from pipeline.config.schema_services import TrackingConfig
from pipeline.tracking.base import NullTracker, metric_key
from pipeline.tracking.mlflow import MlflowTracker, resolve_uri, run_page, ui_command
from pipeline.tracking.session import log_curves, make_tracker, tracking_session

# Runs in a fresh interpreter: what any other process (the MLflow UI) would see.
READ_BACK = """
import json, sys
from mlflow import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
run = client.get_run(sys.argv[2])
history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
           for k in run.data.metrics}
artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
artifacts += sorted(a.path for a in client.list_artifacts(run.info.run_id, "plots"))
print(json.dumps({"params": run.data.params, "history": history, "status": run.info.status,
                  "artifacts": artifacts, "experiment": run.info.experiment_id,
                  "tags": run.data.tags}))
"""


def read_back(uri: str, run_id: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", READ_BACK, uri, run_id], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # One store for the module (creating MLflow's tables takes seconds); one run per test.
    return tmp_path_factory.mktemp("store") / "mlflow.db"


@pytest.fixture
def cfg(store) -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{store}", experiment="t")


def test_rank0_logs_a_run_that_another_process_reads_back(cfg, store, tmp_path):
    tracker = make_tracker(cfg, is_main=True)
    assert isinstance(tracker, MlflowTracker)
    tracker.log_params({"optim.lr": 1e-5, "model.backbone": "resnet50"})
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": 1.0 / step, "eval/recall@1": 0.1 * step}, step)
    (tmp_path / "config.yaml").write_text("a: 1\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    png = log_curves(
        tracker, {"loss": ["train/loss"], "none": ["never/logged"]}, tmp_path / "c.png"
    )
    assert png is not None and png.stat().st_size > 1000
    tracker.finish()

    got = read_back(cfg.uri, tracker.run_id)
    assert got["params"] == {"optim.lr": "1e-05", "model.backbone": "resnet50"}
    assert got["history"]["train/loss"] == [[1, 1.0], [2, 0.5], [3, pytest.approx(1 / 3)]]
    assert [s for s, _ in got["history"]["eval/recall_at_1"]] == [1, 2, 3]
    assert got["status"] == "FINISHED"
    assert got["artifacts"] == ["config.yaml", "plots", "plots/c.png"]
    # Artifacts of a SQLite store live beside the database.
    assert (store.parent / "mlartifacts" / tracker.run_id / "artifacts" / "config.yaml").is_file()


def test_other_ranks_and_disabled_tracking_get_a_null_tracker(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert isinstance(make_tracker(TrackingConfig(uri=uri), is_main=False), NullTracker)
    tracker = make_tracker(TrackingConfig(enabled=False, uri=uri), is_main=True)
    assert isinstance(tracker, NullTracker)
    tracker.log_metrics({"x": 1.0}, 1)  # does nothing, raises nothing
    assert not (tmp_path / "store").exists()


def test_a_continued_run_appends_and_logs_each_step_once(cfg, tmp_path):
    first = make_tracker(cfg, is_main=True)
    first.log_params({"a": 1, "b": "x"})
    for step in range(1, 6):
        first.log_metrics({"train/loss": float(step)}, step)
    first.log_metrics({"eval/map@r": 0.5}, 3)
    # Killed here (no finish): the run stays RUNNING. Logging is asynchronous; the flush
    # stands for the records the killed process had delivered. A resume from a checkpoint
    # at step 3 recomputes steps 4-5 and then goes on to 8.
    assert first.flush(timeout_s=30)
    second = make_tracker(cfg, is_main=True, run_id=first.run_id)
    assert second.run_id == first.run_id
    second.log_params({"a": 1, "b": "x", "c": 2.5})  # same values again, one new param
    for step in range(4, 9):
        second.log_metrics({"train/loss": float(step), "eval/map@r": 0.1 * step}, step)
    second.finish()

    got = read_back(cfg.uri, first.run_id)
    assert got["history"]["train/loss"] == [[s, float(s)] for s in range(1, 9)]
    assert [s for s, _ in got["history"]["eval/map_at_r"]] == [3, 4, 5, 6, 7, 8]
    assert got["params"] == {"a": "1", "b": "x", "c": "2.5"}
    assert got["status"] == "FINISHED"
    assert second.metric_history("train/loss") == [(s, float(s)) for s in range(1, 9)]


def test_changed_params_on_resume_are_reported_and_tagged(cfg, caplog):
    first = make_tracker(cfg, is_main=True)
    first.log_params({"optim.lr": 1e-5})
    assert first.flush(timeout_s=30)
    second = make_tracker(cfg, is_main=True, run_id=first.run_id)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        second.log_params({"optim.lr": 1e-4})
    assert "changed params" in caplog.text
    assert second.flush(timeout_s=30)
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=cfg.uri).get_run(first.run_id)
    assert run.data.params == {"optim.lr": "1e-05"}
    assert run.data.tags["resumed_with_changed_params"] == "optim.lr"


def test_unknown_run_id_is_a_clear_error(cfg):
    with pytest.raises(RuntimeError, match=r"cannot continue MLflow run 'abc123'.*tracking.uri"):
        make_tracker(cfg, is_main=True, run_id="abc123")


def test_uri_resolution_and_names(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_uri(TrackingConfig()) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert resolve_uri(TrackingConfig()) == "http://127.0.0.1:5001"
    assert resolve_uri(TrackingConfig(uri="sqlite:////x.db")) == "sqlite:////x.db"
    relative = TrackingConfig(uri="sqlite:///runs/m.db")
    assert resolve_uri(relative) == f"sqlite:///{tmp_path / 'runs' / 'm.db'}"
    assert metric_key("eval/recall@16") == "eval/recall_at_16"
    assert metric_key("a,b(c)") == "a_b_c_"
    assert ui_command("sqlite:////x/mlflow.db").startswith(
        "mlflow ui --backend-store-uri sqlite:////x/mlflow.db"
    )


def test_session_ends_the_run_finished_killed_or_failed(cfg, tmp_path):
    from mlflow import MlflowClient

    from pipeline.rundir import RunDir

    run_dir = tmp_path / "run"
    params = {"optim": {"lr": 0.5}, "checkpoint": "w.safetensors"}
    with tracking_session(
        cfg, is_main=True, run_dir=run_dir, params=params, tags={"kind": "t"}
    ) as tracker:
        tracker.log_metrics({"eval/map@r": 0.25}, 0)
    # Read in this process (another process reading a run back is the first test's point).
    client = MlflowClient(tracking_uri=cfg.uri)
    got = client.get_run(tracker.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"optim.lr": "0.5", "checkpoint": "w.safetensors"}
    assert got.data.tags["kind"] == "t"
    assert RunDir(run_dir).read_run_id() == tracker.run_id

    # Continued (the run directory records the run), then stopped as Ctrl-C (or a
    # requeue's SystemExit) stops it.
    for error, status in ((KeyboardInterrupt, "KILLED"), (SystemExit, "KILLED")):
        with pytest.raises(error), tracking_session(cfg, is_main=True, run_dir=run_dir) as again:
            assert again.run_id == tracker.run_id
            raise error()
        assert client.get_run(tracker.run_id).info.status == status
    with pytest.raises(ValueError, match="boom"), tracking_session(cfg, is_main=True) as failed:
        raise ValueError("boom")
    assert client.get_run(failed.run_id).info.status == "FAILED"

    # Off rank 0: a null tracker, no run, no file.
    with tracking_session(cfg, is_main=False, run_dir=tmp_path / "other") as null:
        assert isinstance(null, NullTracker) and null.run_id is None
    assert not (tmp_path / "other").exists()


def test_run_page_links_to_the_run():
    assert run_page("http://host:5000/", "3", "abc") == "http://host:5000/#/experiments/3/runs/abc"
    local = run_page("sqlite:////x/mlflow.db", "1", "abc")
    assert local.startswith("mlflow ui --backend-store-uri sqlite:////x/mlflow.db")
    assert local.endswith("http://127.0.0.1:5000/#/experiments/1/runs/abc")
