"""A real ``mlflow server`` process for the tests: a SQLite store and an artifact folder under
``root``, on ``host:port``, in its own process group (so that stopping it stops its workers).

One class serves every test that needs a server: the session's shared server
(tests/conftest.py ``mlflow_server``), the outage tests' server that is killed and started
again on the same port and store, and the multi-host tests' server on the cluster's bridge.
"""

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

from tests.dist_helpers import free_port


class MlflowServer:
    """``mlflow server`` with its store in ``root``; :meth:`start` again reuses the port and
    the store (a restarted head node)."""

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.extra = extra  # more `mlflow server` options (e.g. --app-name basic-auth)
        self.env = env or {}  # more environment for the server
        self.root = Path(root)
        self.host = host
        self.port = port if port is not None else free_port()
        self.url = f"http://{host}:{self.port}"
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow), "server", "--host", self.host, "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.root / 'server.db'}"]
        command += ["--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        command += list(self.extra)
        # MLflow's job runner (a runner and seven huey consumers, each a Python process that
        # imports mlflow) serves server-side jobs that no test submits: off, it saves several
        # CPU-seconds per start on a 2-core machine, and no queue folder is left in /dev/shm.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        with open(self.log, "a") as log:  # the child holds its own descriptor
            self.proc = subprocess.Popen(
                command,
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped with its workers
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout_s: float = 180) -> None:
        """Until ``/health`` answers; a server that exits or stays silent raises with its log."""
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if not self.running() or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
                raise RuntimeError(f"mlflow server on {self.url} did not start: {tail}")
            time.sleep(0.2)

    def ensure_up(self) -> None:
        """Start it if it is not running (a previous test left it down) and wait for it."""
        if not self.running():
            self.start()
        self.wait_healthy()

    def kill(self) -> None:
        """SIGKILL to its process group, as a crashed head node; waits until the port is
        silent."""
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        deadline = time.monotonic() + 30
        while self.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.url} still answers 30 s after SIGKILL")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM to its process group (SIGKILL after 20 s); harmless when not running."""
        if self.running():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@contextmanager
def mlflow_server(
    root: Path, *extra: str, env: dict[str, str] | None = None, timeout_s: float = 90
) -> Iterator[str]:
    """A server of its own for one test (``extra``: more options, ``env``: more environment);
    yields its URL once ``/health`` answers, and stops it with its workers."""
    server = MlflowServer(root, extra=extra, env=env)
    server.start()
    try:
        server.wait_healthy(timeout_s)
        yield server.url
    finally:
        server.stop()
