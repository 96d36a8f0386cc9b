"""pipeline.tracking.sysmetrics against a real MLflow SQLite store, in this process.

Two samplers with different host names stand for two hosts of one job logging into one run.
Measured: 20 s on the shared 2-core machine (load ~13), 18 s of it creating the SQLite
store (its migrations), once for the module."""

from __future__ import annotations

import time

import pytest

from pipeline.tracking import sysmetrics


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    # One store for the module: creating a SQLite store (its migrations) is most of the cost.
    uri = f"sqlite:///{tmp_path_factory.mktemp('sysmetrics') / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("sysmetrics")


@pytest.fixture()
def run(store):
    uri, client, exp = store
    return uri, client, client.create_run(exp).info.run_id


def _wait_for_records(client, run_id, keys, n, timeout_s=30.0):
    # A sampler logs one record per interval; on a loaded machine the first may be late.
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        logged = client.get_run(run_id).data.metrics
        if all(k in logged for k in keys) and all(
            len(client.get_metric_history(run_id, k)) >= n for k in keys
        ):
            return
        time.sleep(0.2)


def test_each_host_logs_under_its_own_name(run):
    uri, client, run_id = run
    hosts = ("hostA", "hostB")
    monitors = [
        sysmetrics.start(run_id, tracking_uri=uri, local_rank=0, interval_s=0.1, host=h)
        for h in hosts
    ]
    assert all(m.active for m in monitors)
    keys = [f"system/{h}/cpu_utilization_percentage" for h in hosts]
    _wait_for_records(client, run_id, keys, n=2)
    for m in monitors:
        m.stop()
        m.stop()  # idempotent
    logged = client.get_run(run_id).data.metrics
    for h in hosts:
        for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            history = client.get_metric_history(run_id, f"system/{h}/{name}")
            steps = sorted(m.step for m in history)
            # One record per interval, numbered 0, 1, ... per host: none lost or doubled.
            assert steps == list(range(len(steps))) and len(steps) >= 2, (h, name, steps)
        assert 0.0 <= logged[f"system/{h}/cpu_utilization_percentage"] <= 100.0
        assert logged[f"system/{h}/system_memory_usage_megabytes"] > 0
    # Nothing is logged without a host name.
    assert not [k for k in logged if k.startswith("system/") and k.count("/") < 2]


def test_only_local_rank_zero_with_a_run_samples(run):
    uri, _, run_id = run
    for kw in (
        {"run_id": run_id, "local_rank": 1},
        {"run_id": None, "local_rank": 0},
        {"run_id": "", "local_rank": 0},
    ):
        m = sysmetrics.start(kw["run_id"], tracking_uri=uri, local_rank=kw["local_rank"])
        assert not m.active
        m.stop()
    off = sysmetrics.start(run_id, tracking_uri=uri, local_rank=0, interval_s=0)
    assert not off.active


def test_a_run_that_does_not_exist_never_raises(store):
    uri = store[0]
    with sysmetrics.start("0" * 32, tracking_uri=uri, local_rank=0, interval_s=0.05) as m:
        assert m.active
        time.sleep(0.3)  # the sampler finds no run and ends quietly
    assert not m.active
