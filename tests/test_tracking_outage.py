"""A tracking outage never stops training.

Fast tests: the start-up check against a port nothing listens on, the outbox (order,
spilling, retries, rejections) against a fake store, and the upload command against SQLite.
Server tests: a real ``mlflow server`` killed and restarted mid-run (same port, same store),
and one that never comes back before the run ends.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.config.schema_services import TrackingConfig
from pipeline.rundir import RunDir
from pipeline.tracking.base import TrackingUnavailable
from pipeline.tracking.mlflow import MlflowTracker
from pipeline.tracking.outbox import Outbox, write_undelivered
from pipeline.tracking.session import make_tracker
from pipeline.tracking.upload import main
from tests.dist_helpers import free_port
from tests.mlflow_server import MlflowServer

HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


@pytest.fixture
def http_env(monkeypatch):
    """The tracker sets MLflow's HTTP variables for the process: give them back afterwards."""
    for name in HTTP_ENV:
        monkeypatch.setenv(name, "unset")  # records the original value for the teardown
        monkeypatch.delenv(name)


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


# --- start-up check -------------------------------------------------------------------


def test_a_server_that_does_not_answer_fails_the_start_in_seconds(http_env):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=rf"{uri} does not answer \(Connection refused"):
        make_tracker(TrackingConfig(uri=uri), is_main=True)
    assert time.monotonic() - start < 10
    # One line naming the three ways out.
    with pytest.raises(TrackingUnavailable) as e:
        make_tracker(TrackingConfig(uri=uri), is_main=True)
    assert "\n" not in str(e.value)
    assert "start it" in str(e.value) and "tracking.uri" in str(e.value)
    assert "tracking.enabled=false" in str(e.value)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    # The same check alone, for a caller that creates the tracker after the engine.
    with pytest.raises(TrackingUnavailable, match=rf"{uri} does not answer"):
        MlflowTracker.check(TrackingConfig(uri=uri))
    MlflowTracker.check(TrackingConfig(uri="sqlite:////nonexistent/dir/m.db"))  # no server


@pytest.mark.slow  # waits out the 10 s HTTP timeout by design
def test_a_hung_server_fails_the_start_within_the_http_timeout(http_env):
    # Accepts connections (the kernel's backlog) and never answers: a frozen server.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingUnavailable, match=rf"{uri} does not answer \(.*timed out"):
            make_tracker(TrackingConfig(uri=uri), is_main=True)
        assert time.monotonic() - start < 15  # MLFLOW_HTTP_REQUEST_TIMEOUT=10 s, no retries


def test_something_else_than_mlflow_at_the_uri_is_a_one_line_error(http_env):
    class NotMlflow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{httpd.server_address[1]}"
        try:
            with pytest.raises(TrackingUnavailable, match=rf"{uri} answers, but not as an MLflow"):
                make_tracker(TrackingConfig(uri=uri), is_main=True)
        finally:
            httpd.shutdown()


def test_upload_to_a_server_that_does_not_answer_is_a_one_line_error(
    tmp_path, capsys, http_env, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's value wins: fast
    uri = f"http://127.0.0.1:{free_port()}"
    spool = write_undelivered([{"kind": "tags", "values": {"a": "1"}}], tmp_path, uri, "r1")
    assert main(["upload", str(spool)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the MLflow tracking server at {uri} does not answer")
    assert err.count("\n") == 1


# --- the outbox, against a fake store ---------------------------------------------------


class FakeStore:
    """Stores what it is sent; ``down`` makes every send fail like a refused connection;
    a record whose values hold ``"bad"`` is rejected like a 400."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.received: list[dict] = []
        self.calls = 0

    def deliver(self, records: list[dict]) -> None:
        self.calls += 1
        if self.down.is_set():
            raise ConnectionRefusedError(111, "Connection refused")
        if any("bad" in r.get("values", {}) for r in records):
            raise ValueError("INVALID_PARAMETER_VALUE: bad key")
        self.received.extend(records)


def make_outbox(store: FakeStore, tmp_path: Path, max_queued: int = 1000) -> Outbox:
    return Outbox(
        store.deliver,
        name="test",
        max_queued=max_queued,
        spill_dir=tmp_path,
        retry_max_s=0.2,
        label="fake-store",
    )


def metric(step: int) -> dict:
    return {"kind": "metrics", "step": step, "timestamp": step, "values": {"loss": float(step)}}


def test_outbox_keeps_order_through_an_outage_and_never_blocks_put(tmp_path):
    store = FakeStore()
    outbox = make_outbox(store, tmp_path)
    for step in range(5):
        outbox.put(metric(step))
    assert outbox.wait_empty(10)
    store.down.set()
    slowest = 0.0
    for step in range(5, 50):
        t0 = time.perf_counter()
        outbox.put(metric(step))
        slowest = max(slowest, time.perf_counter() - t0)
    wait_until(lambda: store.calls > 3, 10, "retries during the outage")
    assert outbox.pending == 45 and outbox.outage_since is not None
    assert slowest < 0.05
    store.down.clear()
    assert outbox.wait_empty(10)
    assert [r["step"] for r in store.received] == list(range(50))
    assert outbox.outage_since is None
    assert outbox.close(1) == []


def test_a_full_outbox_spills_to_disk_in_order_and_reads_back(tmp_path):
    store = FakeStore()
    store.down.set()
    outbox = make_outbox(store, tmp_path, max_queued=5)
    for step in range(40):
        outbox.put(metric(step))
    spills = list(tmp_path.glob("mlflow-queue-*.jsonl"))
    assert len(spills) == 1
    # At most max_queued in memory plus the chunk in flight; the rest is on disk.
    assert len(spills[0].read_text().splitlines()) >= 40 - 5 - 5
    assert [r["step"] for r in outbox.snapshot()] == list(range(40))
    store.down.clear()
    assert outbox.wait_empty(10)
    assert [r["step"] for r in store.received] == list(range(40))
    assert not list(tmp_path.glob("mlflow-queue-*.jsonl"))  # removed once read back
    outbox.close(1)


def test_a_rejected_record_is_isolated_reported_and_kept(tmp_path, capsys):
    store = FakeStore()
    store.down.set()  # queue all of them, so that they go in one chunk
    outbox = make_outbox(store, tmp_path)
    outbox.put(metric(0))
    outbox.put({"kind": "tags", "values": {"bad": "x"}})
    outbox.put(metric(1))
    store.down.clear()
    assert outbox.wait_empty(10)
    assert [r["step"] for r in store.received] == [0, 1]
    assert "rejected a tags record (INVALID_PARAMETER_VALUE: bad key)" in capsys.readouterr().err
    left = outbox.close(1)
    assert left == [
        {"kind": "tags", "values": {"bad": "x"}, "error": "INVALID_PARAMETER_VALUE: bad key"}
    ]


def test_close_returns_what_a_dead_store_did_not_take_within_the_bound(tmp_path):
    store = FakeStore()
    store.down.set()
    outbox = make_outbox(store, tmp_path, max_queued=3)
    for step in range(10):
        outbox.put(metric(step))
    start = time.monotonic()
    left = outbox.close(0.5)
    assert time.monotonic() - start < 3
    assert [r["step"] for r in left] == list(range(10))
    assert not list(tmp_path.glob("mlflow-queue-*.jsonl"))
    with pytest.raises(RuntimeError, match="after finish"):
        outbox.put(metric(10))


# --- the upload command, against SQLite -------------------------------------------------


def read_run(uri: str, run_id: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    history = {
        k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in run.data.metrics
    }
    artifacts = sorted(a.path for a in client.list_artifacts(run_id))
    artifacts += sorted(a.path for a in client.list_artifacts(run_id, "eval"))
    return {
        "steps": history,
        "status": run.info.status,
        "params": run.data.params,
        "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        "artifacts": artifacts,
    }


def upload_cli(spool: Path) -> subprocess.CompletedProcess:
    """The command finish() prints, run as the user would."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.tracking", "upload", str(spool)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.slow  # two upload commands, each a new process importing MLflow
def test_upload_delivers_a_spool_file_once_and_is_idempotent(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    tracker = MlflowTracker(TrackingConfig(uri=uri, experiment="upload"))
    tracker.log_params({"a": 1})
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": float(step)}, step)
    assert tracker.flush(timeout_s=30)
    # What a run that lost its store after step 3 spooled: steps 2-5 (2 and 3 were
    # delivered before the records were spooled), a param, a tag, an artifact, the status.
    (tmp_path / "metrics.json").write_text("{}")
    records = [
        *(
            {"kind": "metrics", "step": s, "timestamp": s, "values": {"loss": s / 1}}
            for s in (2, 3)
        ),
        {"kind": "params", "values": {"a": "1", "b": "2"}},
        *(
            {"kind": "metrics", "step": s, "timestamp": s, "values": {"loss": s / 1}}
            for s in (4, 5)
        ),
        {"kind": "tags", "values": {"note": "spooled"}},
        {"kind": "artifact", "path": str(tmp_path / "metrics.json"), "artifact_path": "eval"},
        {"kind": "status", "status": "FINISHED", "end_time": 5},
    ]
    spool = write_undelivered(records, tmp_path / "run", uri, tracker.run_id)
    assert spool == RunDir(tmp_path / "run").undelivered.resolve()

    first = upload_cli(spool)
    assert first.returncode == 0, first.stderr
    assert "6 records delivered, 2 already there" in first.stdout
    again = upload_cli(spool)
    assert again.returncode == 0, again.stderr
    # Tags and the status are set again (the same values); everything else is skipped.
    assert "2 records delivered, 6 already there" in again.stdout

    got = read_run(uri, tracker.run_id)
    assert got["steps"] == {"loss": [1, 2, 3, 4, 5]}
    assert got["params"] == {"a": "1", "b": "2"}
    assert got["tags"] == {"note": "spooled"}
    assert got["artifacts"] == ["eval", "eval/metrics.json"]
    assert got["status"] == "FINISHED"


# --- a real mlflow server, killed and restarted ------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """This module's own server (not the session's shared one): its tests kill it (SIGKILL,
    as a crashed head node) and start it again on the same port and store."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_outage"))
    srv.start()
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.kill()


def logging_loop(tracker, steps: range, sleep_s: float, at: dict | None = None) -> tuple:
    """Log one step at a time, as training does; ``at[step]()`` runs before that step
    (harness actions, timed apart). Returns (wall time less the harness, slowest call)."""
    harness = slowest = 0.0
    start = time.perf_counter()
    for step in steps:
        if at and step in at:
            t0 = time.perf_counter()
            at[step]()
            harness += time.perf_counter() - t0
        time.sleep(sleep_s)  # the training step
        t0 = time.perf_counter()
        tracker.log_metrics({"train/loss": 1 / step, "train/lr": 0.01}, step)
        slowest = max(slowest, time.perf_counter() - t0)
    return time.perf_counter() - start - harness, slowest


STEPS, SLEEP_S = 60, 0.1
# The outage loop may take at most this much longer than the same loop with the server up:
# the restarting server competes for the 2 cores; a blocking log call took minutes before.
MARGIN_S = 3.0


def assert_each_step_once(uri: str, run_id: str, keys: list[str], steps: range) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for key in keys:
        logged = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert logged == list(steps), key


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_a_server_killed_and_restarted_mid_run_costs_the_loop_nothing(
    server, tmp_path, http_env, capsys
):
    cfg = TrackingConfig(uri=server.url, experiment="outage")
    server.ensure_up()
    baseline = MlflowTracker(cfg, spool_dir=tmp_path / "baseline")
    baseline_s, _ = logging_loop(baseline, range(1, STEPS + 1), SLEEP_S)
    assert baseline.finish(timeout_s=60) is None

    tracker = MlflowTracker(cfg, spool_dir=tmp_path / "run")

    def check_queued() -> None:
        # The outage is real: no step logged since the kill (one record each) is stored.
        assert tracker.pending >= 34 - 15

    outage_s, slowest = logging_loop(
        tracker,
        range(1, STEPS + 1),
        SLEEP_S,
        at={15: server.kill, 34: check_queued, 35: server.start},
    )
    with capsys.disabled():
        print(
            f"\n{STEPS} steps of {SLEEP_S} s: {baseline_s:.2f} s with the server up, "
            f"{outage_s:.2f} s with the outage; slowest log_metrics {slowest * 1000:.1f} ms"
        )
    assert outage_s < baseline_s + MARGIN_S
    assert slowest < 0.5
    server.wait_healthy()
    assert tracker.finish(timeout_s=60) is None  # everything delivered: no file
    assert not RunDir(tmp_path / "run").undelivered.exists()
    assert_each_step_once(server.url, tracker.run_id, ["train/loss", "train/lr"], range(1, 61))
    err = capsys.readouterr().err
    assert f"{server.url} does not answer" in err and "answers again" in err


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_a_server_that_never_comes_back_leaves_a_file_that_upload_delivers_once(
    server, tmp_path, http_env, capsys, caplog
):
    server.ensure_up()
    run_dir = tmp_path / "run"
    tracker = MlflowTracker(TrackingConfig(uri=server.url, experiment="outage"))
    tracker.log_params({"optim.lr": 1e-3})
    logging_loop(tracker, range(1, 11), 0.0)
    assert tracker.flush(timeout_s=30)
    server.kill()
    logging_loop(tracker, range(11, 31), 0.0)
    tracker.set_tags({"phase": "outage"})
    (tmp_path / "metrics.json").write_text("{}")
    tracker.log_artifact(tmp_path / "metrics.json", "eval")  # queued, not raised

    bound_s = 3.0
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="pipeline.tracking"):
        spool = tracker.finish("FINISHED", spool_dir=run_dir, timeout_s=bound_s)
    # The bound (a refused connection fails at once; a hung server would add one HTTP
    # timeout, 10 s, for the call in flight).
    finish_s = time.monotonic() - start
    assert finish_s < bound_s + 2
    assert spool == RunDir(run_dir).undelivered.resolve() == tracker.undelivered_path
    lines = [json.loads(line) for line in spool.read_text().splitlines()]
    assert lines[0] == {
        "kind": "header",
        "version": 1,
        "tracking_uri": server.url,
        "run_id": tracker.run_id,
    }
    kinds = [r["kind"] for r in lines[1:]]
    assert kinds == ["metrics"] * 20 + ["tags", "artifact", "status"]
    # The pipeline's log (rank 0 prints it) names the file and the command that delivers it.
    assert f"python -m pipeline.tracking upload {spool}" in caplog.text

    server.start()
    server.wait_healthy()
    first = upload_cli(spool)
    assert first.returncode == 0, first.stderr
    assert "23 records delivered, 0 already there" in first.stdout
    again = upload_cli(spool)  # finds the metrics and the artifact there
    assert again.returncode == 0, again.stderr
    assert "2 records delivered, 21 already there" in again.stdout
    with capsys.disabled():
        print(f"\nfinish() with the server gone: {finish_s:.2f} s (bound {bound_s} s)")
    got = read_run(server.url, tracker.run_id)
    assert got["steps"] == {"train/loss": list(range(1, 31)), "train/lr": list(range(1, 31))}
    assert got["status"] == "FINISHED"
    assert got["tags"] == {"phase": "outage"}
    assert got["artifacts"] == ["eval", "eval/metrics.json"]
