"""Credentials given in URIs stay in the process: redaction rules, the config, logs, the job
pickle, and a real training run against an ``mlflow server`` with basic authentication."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline import secrets
from pipeline.config.load import flatten, load_config, save_config
from pipeline.config.runconfig import to_dict
from tests.mlflow_server import mlflow_server

PASSWORD = "Zq7-secret-pw"


@pytest.fixture
def clean_env(monkeypatch):
    """No MLflow credentials or kept URIs from elsewhere; whatever a test sets is undone."""
    for name in (secrets.MLFLOW_USERNAME, secrets.MLFLOW_PASSWORD, secrets.ENV_KEEP):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(secrets.ENV_KEEP, "{}")


@pytest.mark.parametrize(
    ("uri", "redacted", "stripped"),
    [
        ("http://u:pw@h:5000", "http://***@h:5000", "http://h:5000"),
        (
            "https://tok@h/x?a=1&token=zz&b=2",
            "https://***@h/x?a=1&token=***&b=2",
            "https://h/x?a=1&b=2",
        ),
        ("https://h/x?token=zz&b=2", "https://h/x?token=***&b=2", "https://h/x?b=2"),
        ("s3://b/p?X-Amz-Signature=abc", "s3://b/p?X-Amz-Signature=***", "s3://b/p"),
        ("http://u:p@ss@h/a", "http://***@h/a", "http://h/a"),
    ],
)
def test_redact_and_strip(uri, redacted, stripped):
    assert secrets.has_credentials(uri)
    assert secrets.redact(f"at {uri} now") == f"at {redacted} now"
    assert secrets.strip_uri(uri) == stripped


@pytest.mark.parametrize(
    "text", ["sqlite:////tmp/a@b.db", "mail x@y.com", "http://h/a@b", "file:///x", "k=v"]
)
def test_text_without_credentials_is_left_alone(text):
    assert not secrets.has_credentials(text)
    assert secrets.redact(text) == text == secrets.strip_uri(text)


def test_config_keeps_credentials_in_the_environment(tiny_config, tmp_path, clean_env, caplog):
    url = f"http://admin:{PASSWORD}@127.0.0.1:1"
    shard_url = f"https://reader:{PASSWORD}@data.example:8443/train-{{000..003}}.tar"
    with caplog.at_level(logging.WARNING, logger="pipeline.secrets"):
        cfg = load_config(
            tiny_config(Path("/nonexistent")),
            [f"tracking.uri={url}", f"data.train=[{{name: s, urls: '{shard_url}'}}]"],
        )
    assert cfg.tracking.uri == "http://127.0.0.1:1"
    assert cfg.data.train[0].urls == "https://data.example:8443/train-{000..003}.tar"
    # Accepted with a warning that names the key and not the secret.
    assert "tracking.uri: credentials in the URI" in caplog.text
    assert "data.train.0.urls: credentials in the URI" in caplog.text
    assert PASSWORD not in caplog.text
    # MLflow reads its own variables; a shard of the pattern gets its user-info back.
    assert os.environ[secrets.MLFLOW_USERNAME] == "admin"
    assert os.environ[secrets.MLFLOW_PASSWORD] == PASSWORD
    assert secrets.with_credentials("https://data.example:8443/train-002.tar") == (
        f"https://reader:{PASSWORD}@data.example:8443/train-002.tar"
    )
    assert secrets.with_credentials("https://elsewhere/train-002.tar") == (
        "https://elsewhere/train-002.tar"
    )
    # Nothing written from the config holds it: the saved file, the params, the job pickle.
    save_config(cfg, tmp_path / "saved.yaml")
    assert PASSWORD not in (tmp_path / "saved.yaml").read_text()
    assert PASSWORD not in json.dumps(flatten(to_dict(cfg)))
    assert PASSWORD.encode() not in pickle.dumps(cfg)


def test_log_lines_are_redacted(tmp_path):
    from pipeline import logs

    path = logs.setup_logging(tmp_path / "rank0.log", rank=0)
    try:
        logging.getLogger("pipeline.x").warning("store %s", f"http://a:{PASSWORD}@h/")
        try:
            raise RuntimeError(f"cannot reach https://a:{PASSWORD}@h/")
        except RuntimeError:
            logging.getLogger("pipeline.x").exception("failed")
    finally:
        root = logging.getLogger(logs.LOGGER)
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        root.propagate = True
    text = path.read_text()
    assert "store http://***@h/" in text and "cannot reach https://***@h/" in text
    assert PASSWORD not in text


def _scan(root: Path) -> list[str]:
    """Files under ``root`` whose bytes hold the password (plain or percent-encoded)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_run_with_password_in_tracking_uri_leaks_it_nowhere(
    tmp_path, synthetic_shards, tiny_config, clean_env
):
    shards = synthetic_shards(classes=8, test_classes=4, images_per_class=8, samples_per_shard=64)
    config = tiny_config(
        shards,
        sampler={"samples_per_class": 2, "steps_per_epoch": 2},
        train={"epochs": 1, "log_every": 1},
        tracking={"experiment": "auth", "system_metrics_interval_s": 0},
    )
    server_root = tmp_path / "server"
    server_root.mkdir()
    auth = server_root / "auth.ini"
    auth.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{server_root / 'auth.db'}\n"
        f"admin_username = admin\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # One password check per minute, not per request (PBKDF2 is slow on purpose).
        "auth_cache_ttl_seconds = 60\n"
    )
    # The auth app needs a fixed key for its CSRF protection.
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(auth), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key"}
    with mlflow_server(server_root, "--app-name", "basic-auth", env=env) as url:
        # The server asks for credentials.
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
        host = url.removeprefix("http://")
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        run_env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        command = [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config)]
        proc = subprocess.run(
            [*command, f"tracking.uri=http://admin:{PASSWORD}@{host}"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=run_env,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "tracking.uri: credentials in the URI" in proc.stderr
        assert PASSWORD not in proc.stdout and PASSWORD not in proc.stderr
        run_id = json.loads(proc.stdout.strip().splitlines()[-1])["run_id"]

        from mlflow import MlflowClient

        os.environ[secrets.MLFLOW_USERNAME] = "admin"
        os.environ[secrets.MLFLOW_PASSWORD] = PASSWORD
        run = MlflowClient(tracking_uri=url).get_run(run_id)
    # The run reached the server: finished, with its params, metrics and artifacts.
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == url
    assert "train/loss" in run.data.metrics
    artifacts = list((server_root / "artifacts").rglob("*"))
    assert any(p.name == "config.yaml" for p in artifacts)
    values = [*run.data.params.values(), *run.data.tags.values()]
    assert not [v for v in values if PASSWORD in v]
    assert _scan(server_root / "artifacts") == []
    assert _scan(tmp_path / "run") == []


class _PickleOnlyExecutor:
    """Stands in for submitit's executor after its first step: ``submit`` writes the job's
    pickle as submitit does (``DelayedSubmission.dump``), and runs nothing."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.files = folder, []

    def submit(self, job):
        from submitit.core.utils import DelayedSubmission

        path = self.folder / f"{len(self.files)}_submitted.pkl"
        DelayedSubmission(job).dump(path)
        self.files.append(path)
        return path


def test_job_pickles_for_slurm_hold_no_credentials(tmp_path, tiny_config, clean_env, monkeypatch):
    from launch import slurm

    executor = _PickleOnlyExecutor(tmp_path)
    monkeypatch.setattr(slurm, "make_executor", lambda *a, **k: executor)
    config = tiny_config(Path("/nonexistent"))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    uri = f"tracking.uri=http://admin:{PASSWORD}@127.0.0.1:1"
    flags = {"gpus_per_node": 0, "tasks_per_node": 1}
    slurm.submit("train", config, [uri], flags=flags, local=True)
    slurm.submit("evaluate", config, [f"checkpoint={weights}", uri], flags=flags, local=True)
    assert len(executor.files) == 2
    assert [p.name for p in executor.files if PASSWORD.encode() in p.read_bytes()] == []
    # The job gets the credentials back from the environment it inherits.
    assert os.environ[secrets.MLFLOW_PASSWORD] == PASSWORD
