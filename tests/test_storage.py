"""pipeline.data.storage without a server: URL handling, and credentials kept out of configs."""

from __future__ import annotations

import pytest
import torch

from pipeline.config.load import load_config
from pipeline.config.schema import ConfigError
from pipeline.data import storage


def test_urls_and_prefix_paths():
    assert storage.join("s3://bkt/a/", "x.tar") == "s3://bkt/a/x.tar"
    assert storage.parent("s3://bkt/a/train/x.tar") == "s3://bkt/a/train"
    assert storage.basename("s3://bkt/a/train/") == "train"
    assert storage.split_url("s3://bkt/a/train") == ("bkt", "a/train")
    path = storage.S3Path("s3://bkt/a/train/")
    assert str(path / "index.parquet") == "s3://bkt/a/train/index.parquet"
    assert (path.name, str(path.parent), path.resolve()) == ("train", "s3://bkt/a", path)
    with pytest.raises(storage.StorageError, match=r"^s3://ab/x: 'ab' is not a bucket name"):
        storage.split_url("s3://ab/x")


@pytest.mark.parametrize(
    "key", ["data.storage.aws_secret_access_key", "data.storage.access_key", "tracking.token"]
)
def test_a_config_key_holding_a_credential_is_refused_in_one_line(key, tmp_path):
    with pytest.raises(ConfigError, match=rf"^config key '{key}' would hold a credential"):
        load_config(None, [f"{key}=abc"])
    section, *rest = key.split(".")
    tree = {rest[-1]: "abc"}
    for part in reversed(rest[:-1]):
        tree = {part: tree}
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump({section: tree}))
    with pytest.raises(ConfigError, match=rf"config key '{key}' would hold a credential.*AWS_"):
        load_config(path)


def test_storage_settings_from_the_config_then_the_aws_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    cfg = load_config(None, [])
    storage.configure(cfg.data.storage)
    assert (storage.settings().endpoint_url, storage.settings().region) == (
        "http://127.0.0.1:1",
        "eu-west-3",
    )
    cfg = load_config(
        None, ["data.storage.endpoint_url=http://store:9000", "data.storage.region=r1"]
    )
    storage.configure(cfg.data.storage)
    try:
        assert (storage.settings().endpoint_url, storage.settings().region) == (
            "http://store:9000",
            "r1",
        )
    finally:
        storage.configure(load_config(None, []).data.storage)
    with pytest.raises(ConfigError, match=r"^data\.storage\.endpoint_url='store:9000': must be"):
        load_config(None, ["data.storage.endpoint_url=store:9000"])


class _FailingShard(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise storage.StorageError("s3://bkt/ds/train/x-000001.tar: GET failed 8 times at E")
        yield


def test_a_shard_that_fails_in_a_loader_worker_is_still_one_line():
    loader = torch.utils.data.DataLoader(
        _FailingShard(), batch_size=None, num_workers=1, multiprocessing_context="fork"
    )
    with pytest.raises(storage.StorageError) as info:
        next(iter(loader))
    assert str(info.value) == (
        "s3://bkt/ds/train/x-000001.tar: GET failed 8 times at E (DataLoader worker process 0)"
    )
