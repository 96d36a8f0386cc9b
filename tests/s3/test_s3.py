"""Splits in a real S3 server (SeaweedFS on 127.0.0.1, one per session): make-shards publishes
there, validate-shards checks it against the catalog, two gloo ranks stream the same batches as
from disk, a server outage mid-epoch is retried (counted) without changing a batch, and refused
credentials or a missing bucket stop a run at preflight, in one line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from pipeline.config.runconfig import RunConfig
from pipeline.config.schema import StorageConfig
from pipeline.data import storage, storage_ops
from pipeline.data.catalog import expand_urls
from pipeline.data.eval_stream import eval_loader
from pipeline.data.stream import train_loader
from pipeline.data.validate import validate_split
from pipeline.data.writer import ShardWriteError
from pipeline.preflight import PreflightError, preflight
from tests.data_helpers import cfgs
from tests.dist_helpers import run_distributed
from tests.s3.conftest import make_shards
from tests.s3.server import BUCKET
from tests.tiny import tiny_run_config, write_config

pytestmark = [pytest.mark.s3, pytest.mark.slow]

STEPS = 6


def test_make_shards_publishes_the_split_validate_shards_checks_it(s3_env, s3_dataset, capsys):
    from pipeline.cli import main

    url, local = s3_dataset
    for split in ("train", "test"):
        objects = storage_ops.list_objects(f"{url}/{split}")
        files = sorted(p.name for p in (local / split).iterdir())
        assert sorted(objects) == files
        for name in files:  # byte for byte what the same command wrote on disk
            assert (
                storage.read_bytes(f"{url}/{split}/{name}") == (local / split / name).read_bytes()
            )
    for prefix in storage_ops.list_prefixes(url):  # the staging prefixes were emptied
        assert ".partial-" not in prefix or not storage_ops.list_objects(prefix)
    assert main(["validate-shards", url]) == 0
    out = capsys.readouterr().out
    assert f"{url}/train: 64 samples read, 0 problems" in out
    assert f"{url}/test: 24 samples read, 0 problems" in out
    with pytest.raises(ShardWriteError, match=rf"^{url}/train already holds \d+ object\(s\); pass"):
        make_shards(url)
    before = {
        n: storage_ops.head(f"{url}/train/{n}") for n in storage_ops.list_objects(f"{url}/train")
    }
    make_shards(url, "--overwrite")  # the same split again: the same objects
    assert {
        n: storage_ops.head(f"{url}/train/{n}") for n in storage_ops.list_objects(f"{url}/train")
    } == before


def test_validate_shards_trusts_the_catalog_not_the_listing(s3_env, s3_dataset):
    url, local = s3_dataset
    copy = f"s3://{url.split('/')[2]}/changed/train"
    for name in storage_ops.list_objects(f"{url}/train"):
        storage_ops.copy_object(f"{url}/train/{name}", f"{copy}/{name}")
    shard = sorted(p for p in (local / "train").glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, so a listing cannot tell
    changed = Path(os.environ.get("TMPDIR", "/tmp")) / f"changed-{os.getpid()}.tar"
    changed.write_bytes(bytes(data))
    try:
        storage_ops.put_file(changed, f"{copy}/{shard.name}")
    finally:
        changed.unlink()
    _, problems = validate_split(copy)
    assert any(
        p.startswith(f"{shard.name}: MD5 ") and "index.parquet says" in p for p in problems
    ), problems
    storage_ops.delete_object(f"{copy}/index.parquet")  # unpublished: no longer a split
    with pytest.raises(
        storage.StorageNotFound, match=r"index\.parquet does not exist, so .* is not a split"
    ):
        expand_urls(copy)


def _worker(rank: int, world_size: int, url: str, out: str) -> None:
    from pipeline.distributed import collectives

    data, sampler = cfgs(url, p=3, k=2, steps=STEPS, workers=2)
    batches = []
    for x, y in train_loader(data, sampler, rank=rank, world_size=world_size, epoch=1):
        batches.append((x, y))
        collectives.all_gather_nograd(y)  # all ranks participate, every step (as in training)
    torch.save(batches, Path(out) / f"rank{rank}.pt")


@pytest.mark.distributed
def test_two_ranks_stream_from_the_store_the_batches_they_stream_from_disk(
    s3_env, s3_dataset, tmp_path
):
    url, local = s3_dataset
    run_distributed(_worker, 2, f"{url}/train", str(tmp_path))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        data, sampler = cfgs(str(local / "train"), p=3, k=2, steps=STEPS, workers=0, streams=2)
        want = list(train_loader(data, sampler, rank=rank, world_size=2, epoch=1))
        assert len(got) == len(want) == STEPS
        for (x, y), (x2, y2) in zip(got, want):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    # evaluation reads the store as it reads the disk, too
    data, _ = cfgs(f"{url}/test", workers=0)
    got = list(eval_loader(f"{url}/test", data, rank=0, world_size=1, batch_size=10))
    want = list(eval_loader(str(local / "test"), data, rank=0, world_size=1, batch_size=10))
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def _restart_later(server, delay_s: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (threading.Event().wait(delay_s), server.start()))
    thread.start()
    return thread


def test_outage_mid_epoch_is_retried_counted_and_changes_no_batch(s3_env, s3_dataset):
    url, local = s3_dataset
    patient = StorageConfig(read_attempts=24, retry_wait_s=0.1, retry_max_wait_s=2.0)
    data, sampler = cfgs(f"{url}/train", p=3, k=2, steps=24, workers=2, buffer=3)
    data = dataclasses.replace(data, storage=patient)
    local_data, local_sampler = cfgs(
        str(local / "train"), p=3, k=2, steps=24, workers=0, streams=2, buffer=3
    )
    want = list(train_loader(local_data, local_sampler, rank=0, world_size=1, epoch=0))
    batches = iter(train_loader(data, sampler, rank=0, world_size=1, epoch=0))
    got = [next(batches)]
    before = storage.read_retries()
    s3_env.stop()  # mid-epoch: the workers have 23 batches to go, and more shards to read
    restart = _restart_later(s3_env, 1.0)
    got.extend(batches)
    restart.join()
    # the stream's reader thread met the outage (forked workers' retries, with
    # data.loader=processes, reach this process's count too)
    assert storage.read_retries() > before
    assert len(got) == len(want) == 24
    for (x, y), (x2, y2) in zip(got, want):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_a_read_cut_mid_object_resumes_at_its_offset(s3_env):
    data = os.urandom(24 << 20)  # larger than what socket buffers hold
    url = f"s3://{BUCKET}/resume/blob.bin"
    source = Path(os.environ.get("TMPDIR", "/tmp")) / f"blob-{os.getpid()}.bin"
    source.write_bytes(data)
    try:
        storage_ops.put_file(source, url)
    finally:
        source.unlink()
    storage.configure(StorageConfig(read_attempts=24, retry_wait_s=0.1, retry_max_wait_s=2.0))
    try:
        before = storage.read_retries()
        with storage.open_read(url) as f:
            head = f.read(1 << 20)
            s3_env.stop()
            restart = _restart_later(s3_env, 0.5)
            rest = f.read()
        restart.join()
    finally:
        storage.configure(StorageConfig())
    assert head + rest == data
    assert storage.read_retries() > before


def _cfg(train_urls: str, eval_urls: str) -> RunConfig:
    data, sampler = cfgs(train_urls, p=3, k=2, steps=4)
    return RunConfig(data=dataclasses.replace(data, eval_urls=eval_urls), sampler=sampler)


def test_refused_credentials_or_a_missing_bucket_stop_the_run_at_preflight(
    s3_env, s3_dataset, monkeypatch, tmp_path
):
    url, _ = s3_dataset
    report = preflight(_cfg(f"{url}/train", f"{url}/test"), world_size=2)
    assert "data.train[0] (d0): 8 shards, 64 samples, 16 classes" in report.lines[0]
    with pytest.raises(
        PreflightError,
        match=r"^data\.train\[0\]\.urls='s3://nobucket/synthetic/train': s3://nobucket/synthetic/"
        r"train: bucket 'nobucket' does not exist at http://127\.0\.0\.1:\d+; check the URL",
    ):
        preflight(_cfg("s3://nobucket/synthetic/train", f"{url}/test"), world_size=2)
    with pytest.raises(
        ShardWriteError, match=r"^--out s3://nobucket/x: s3://nobucket/x/train: bucket 'nobucket'"
    ):
        make_shards("s3://nobucket/x")  # refused before any image is converted
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(
        PreflightError,
        match=rf"^data\.train\[0\]\.urls='{url}/train': {url}/train/index\.parquet: "
        r"http://127\.0\.0\.1:\d+ refused the credentials \(\w+\); check AWS_ACCESS_KEY_ID",
    ):
        preflight(_cfg(f"{url}/train", f"{url}/test"), world_size=2)
    # the real command: one line, exit 2, before any engine or tracking starts
    cfg = tiny_run_config(Path("unused"), tmp_path / "run", tracking={"enabled": False})
    cfg["data"]["train"][0]["urls"] = f"{url}/train"
    cfg["data"]["eval_urls"] = f"{url}/test"
    config = write_config(tmp_path / "run.yaml", cfg)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    # (other lines: warnings that libraries print on import)
    errors = [line for line in done.stderr.splitlines() if line.startswith("pipeline train:")]
    assert len(errors) == 1 and "refused the credentials" in errors[0], done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_build_gallery_embeds_a_split_from_the_store_as_from_disk(s3_env, s3_dataset, tmp_path):
    from pipeline.cli import main
    from pipeline.config.schema_train import ModelConfig
    from pipeline.model import build_model
    from pipeline.weights import save_weights

    url, local = s3_dataset
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", embedding_dim=8))
    weights = save_weights(model.state_dict(), model.architecture, tmp_path / "m.safetensors")
    cfg = ["data.image_size=24", "data.resize_size=24", "data.num_workers=0"]
    for name, shards in (("s3", f"{url}/test"), ("disk", str(local / "test"))):
        argv = ["build-gallery", "--weights", str(weights), *cfg, "--shards", shards]
        assert main([*argv, "--out", str(tmp_path / name)]) == 0
    files = sorted(p.name for p in (tmp_path / "disk").iterdir())
    assert sorted(p.name for p in (tmp_path / "s3").iterdir()) == files
    for name in files:
        if name.endswith(".json"):  # the manifest names its source and timings
            continue
        assert (tmp_path / "s3" / name).read_bytes() == (tmp_path / "disk" / name).read_bytes()
