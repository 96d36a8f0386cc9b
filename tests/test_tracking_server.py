"""A run logged over HTTP to a real ``mlflow server`` that the test starts on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.config.schema import TrackingConfig
from pipeline.tracking.session import make_tracker
from tests.dist_helpers import free_port

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=root,
        stdout=open(root / "server.log", "w"),  # noqa: SIM115 (closed with the process)
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped with its workers below
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url, root
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_run_logged_over_http_and_continued(server, tmp_path):
    from mlflow import MlflowClient

    url, root = server
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
    # The server stored the artifact where it was told to.
    assert list((root / "artifacts").rglob("config.yaml"))
