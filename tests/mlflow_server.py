"""Start a real ``mlflow server`` on 127.0.0.1 for a test, and stop it with its workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.dist_helpers import free_port


@contextmanager
def mlflow_server(
    root: Path, *extra: str, env: dict[str, str] | None = None, timeout_s: float = 90
) -> Iterator[str]:
    """An ``mlflow server`` with its store and artifacts under ``root`` (``extra``: more
    options, ``env``: more environment); yields its URL once ``/health`` answers."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    args = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}"]
    args += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1"]
    args += ["--port", str(port), "--workers", "1", *extra]
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(
            args,
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: stopped with its workers below
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while not _healthy(url):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(
                    f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its workers too), SIGKILL after 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # the whole group has ended
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
