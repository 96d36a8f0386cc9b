"""A run logged over HTTP to a real ``mlflow server`` on 127.0.0.1 (the session's shared
server, tests/conftest.py)."""

from __future__ import annotations

import pytest

from pipeline.config.schema_services import TrackingConfig
from pipeline.tracking.session import make_tracker

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]


def test_run_logged_over_http_and_continued(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    url, root = mlflow_server.url, mlflow_server.root
    cfg = TrackingConfig(uri=url, experiment="http-test", run_name="over-http")
    tracker = make_tracker(cfg, is_main=True)
    tracker.log_params({"optim.lr": 1e-5})
    tracker.log_metrics({"train/loss": 0.9}, 1)
    tracker.log_metrics({"train/loss": 0.8}, 2)
    (tmp_path / "config.yaml").write_text("optim: {lr: 1.0e-5}\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    # A resumed job continues the run (step 2 recomputed, logged once); the flush stands for
    # what the first job had delivered (logging is asynchronous).
    assert tracker.flush(timeout_s=30)
    resumed = make_tracker(cfg, is_main=True, run_id=tracker.run_id)
    resumed.log_metrics({"train/loss": 0.8}, 2)
    resumed.log_metrics({"train/loss": 0.7}, 3)
    resumed.finish()

    client = MlflowClient(tracking_uri=url)
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "over-http"
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "1e-05"}
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")
    )
    assert history == [(1, 0.9), (2, 0.8), (3, pytest.approx(0.7))]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    # The server stored the artifact where it was told to, under this run (the server is
    # shared: another test's run may store a file of the same name).
    stored = [p for p in (root / "artifacts").rglob("config.yaml") if tracker.run_id in p.parts]
    assert stored, sorted(map(str, (root / "artifacts").rglob("*")))
