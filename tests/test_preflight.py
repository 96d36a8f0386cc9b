"""pipeline.preflight against tiny real shards written here: each rule, one error line each."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.config.runconfig import RunConfig
from pipeline.config.schema_services import EvalConfig
from pipeline.config.schema_train import ModelConfig, TrainConfig
from pipeline.eval.protocols import preflight  # what entry points run: shards, then protocol
from pipeline.preflight import PreflightError, _tar_lower_bound, check_global_batch
from tests.data_helpers import cfgs, tiny_split


@pytest.fixture(scope="module")
def shards(synthetic_split):
    # 12 classes x 6 images, <= 20 per shard, classes never split: 4 shards of 3 classes.
    train = synthetic_split(split="train", classes=12, per_class=6, samples_per_shard=20)
    test = synthetic_split(split="test", classes=5, per_class=4, samples_per_shard=10, seed=1)
    return train, test


def run_cfg(train, test, *, p=4, k=3, epochs=2, policy="replace", streams=0, workers=0, **kw):
    data, sampler = cfgs(str(train), p=p, k=k, policy=policy, streams=streams, workers=workers)
    data.eval_urls = str(test)
    return RunConfig(
        data=data, sampler=sampler, train=TrainConfig(epochs=epochs), model=ModelConfig(), **kw
    )


def one_line(info) -> str:
    text = str(info.value)
    assert "\n" not in text
    return text


def test_good_shards_pass_and_are_reported(shards):
    report = preflight(run_cfg(*shards), world_size=2)
    assert report.lines[0].startswith("data.train[0] (d0): 4 shards, 72 samples, 12 classes")
    assert "data.eval_urls: " in report.lines[1]


def test_the_tar_bound_is_below_every_real_shard(shards):
    import pyarrow.parquet as pq

    for split in shards:
        table = pq.read_table(split / "index.parquet").to_pydict()
        for shard in set(table["shard"]):
            need = sum(
                _tar_lower_bound(b) for s, b in zip(table["shard"], table["bytes"]) if s == shard
            )
            assert need <= os.path.getsize(split / shard)


def test_missing_eval_shards_are_found_before_training(shards, tmp_path):
    cfg = run_cfg(*shards)
    cfg.data.eval_urls = str(tmp_path / "nope" / "test")
    with pytest.raises(
        PreflightError, match=r"^data\.eval_urls='.*nope/test': shard spec .* do not exist"
    ) as info:
        preflight(cfg, 1)
    one_line(info)
    preflight(cfg, 1, evaluate=False)  # the training half alone is fine


def test_missing_train_shards(shards, tmp_path):
    cfg = run_cfg(tmp_path / "empty", shards[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        PreflightError,
        match=r"^data\.train\[0\]\.urls='.*empty': shard directory .* holds no \*\.tar",
    ):
        preflight(cfg, 1)


def test_fewer_shards_than_ranks(shards):
    with pytest.raises(
        PreflightError,
        match=r"^data\.train\[0\] \(d0\): 4 shard\(s\) .* for 5 ranks; .*use at most 4 ranks or "
        r"rewrite the dataset with a smaller --samples-per-shard",
    ):
        preflight(run_cfg(*shards), 5)


def test_p_classes_per_stream(shards):
    # 2 ranks: each reads 2 shards = 6 classes; P = 7 cannot be filled, P = 6 can.
    preflight(run_cfg(*shards, p=6), 2)
    with pytest.raises(
        PreflightError,
        match=r"^data\.train\[0\] \(d0\): in epoch 0, rank \d of 2, stream 0 of 1 reads 2 shard"
        r"\(s\) holding 6 classes \(sampler\.small_class_policy='replace'\), but a batch needs "
        r"P=7 distinct classes .*the dataset has 12 such classes in 4 shards for 2 ranks x 1 "
        r"streams: lower sampler\.classes_per_batch to 6",
    ) as info:
        preflight(run_cfg(*shards, p=7), 2)
    one_line(info)
    # 2 streams per rank (one per worker) halve it again.
    with pytest.raises(
        PreflightError, match=r"stream \d of 2 reads 1 shard\(s\) holding 3 classes"
    ):
        preflight(run_cfg(*shards, p=4, workers=2), 2)


def test_k_with_skip_policy_counts_classes_with_k_images(tmp_path, shards):
    # Classes of 2..7 images; with K=4 and 'skip' only classes with >= 4 images give a group.
    train = tiny_split(
        tmp_path, "train", classes=6, per_class_sizes=[2, 3, 4, 5, 6, 7], samples_per_shard=100
    )
    preflight(run_cfg(train, shards[1], p=4, k=4, policy="skip"), 1)
    preflight(run_cfg(train, shards[1], p=6, k=4, policy="replace"), 1)
    with pytest.raises(
        PreflightError,
        match=r"holding 4 classes with >= K=4 images in one shard \(sampler\.small_class_policy="
        r"'skip'\), but a batch needs P=5 .*or set sampler\.small_class_policy='replace'",
    ):
        preflight(run_cfg(train, shards[1], p=5, k=4, policy="skip"), 1)


def test_streams_not_a_multiple_of_workers(shards):
    with pytest.raises(PreflightError, match=r"sampler\.streams_per_rank=3 is not a multiple"):
        preflight(run_cfg(*shards, streams=3, workers=2), 1)


def copy_split(src, dst):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_shard_is_named_with_the_fix(shards, tmp_path):
    train = copy_split(shards[0], tmp_path / "train")
    victim = sorted(train.glob("*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[: os.path.getsize(victim) // 2])
    with pytest.raises(
        PreflightError,
        match=rf"^data\.train\[0\]\.urls='.*train': shard .*{victim.name} is \d+ bytes, but its "
        r"\d+ samples in index\.parquet need at least \d+: the shard is truncated .*run "
        r"`pipeline validate-shards .*train`, then re-copy or rewrite it",
    ) as info:
        preflight(run_cfg(train, shards[1]), 1)
    one_line(info)


def test_sizes_json_disagreeing_with_the_index(shards, tmp_path):
    test = copy_split(shards[1], tmp_path / "test")
    sizes = json.loads((test / "sizes.json").read_text())
    first = next(iter(sizes))
    sizes[first] += 1
    (test / "sizes.json").write_text(json.dumps(sizes))
    cfg = run_cfg(*shards)
    cfg.data.eval_urls = str(test)
    with pytest.raises(
        PreflightError,
        match=rf"^data\.eval_urls='.*test': shard .*{first} has \d+ samples in sizes\.json but "
        r"\d+ rows in index\.parquet: .*validate-shards",
    ):
        preflight(cfg, 1)


def test_eval_split_without_positives(shards, tmp_path):
    single = tiny_split(tmp_path, "test", classes=5, per_class=1)
    with pytest.raises(
        PreflightError,
        match=r"^data\.eval_urls='.*test': 5 samples and no class with 2 of them, so no query has "
        r"a positive",
    ):
        preflight(run_cfg(shards[0], single), 1)


def test_ijbc_needs_its_lists_and_ids(shards, tmp_path):
    cfg = run_cfg(*shards, eval=EvalConfig(protocol="ijbc"))
    with pytest.raises(
        PreflightError,
        match=r"^eval\.protocol=ijbc: data\.eval_urls leads to '.*test', which has neither "
        r"pairs\.parquet .* nor ijbc_template_pair_label\.txt",
    ):
        preflight(cfg, 1)
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "ijbc_template_pair_label.txt").write_text("1 2 1\n")
    cfg.eval.ijbc_protocol = str(meta)
    with pytest.raises(
        PreflightError, match=r"index\.parquet has no \['media_id', 'template_id'\] column"
    ):
        preflight(cfg, 1)


def test_missing_pretrained_weights(shards):
    cfg = run_cfg(*shards)
    cfg.model.pretrained_path = "weights/nope.pth"
    with pytest.raises(
        PreflightError,
        match=r"^model\.pretrained_path='weights/nope\.pth': the file does not exist",
    ):
        preflight(cfg, 1)


def test_world_size_that_cannot_keep_the_global_batch(shards):
    cfg = run_cfg(*shards, p=4, k=3)  # 2 ranks x 4 x 3 = a global batch of 24
    check_global_batch(cfg, 2, 24)
    with pytest.raises(
        PreflightError,
        match=r"^world size 3 cannot keep the global batch of 24 images: .*24 is not a multiple "
        r"of 3 x 3; run on one of \[1, 2, 4, 8\] ranks",
    ):
        preflight(cfg, 3, global_batch=24)
    with pytest.raises(
        PreflightError,
        match=r"^sampler\.classes_per_batch=4 on 4 ranks gives a global batch of 48 images, not "
        r"24: set sampler\.classes_per_batch=2 to keep it",
    ):
        check_global_batch(cfg, 4, 24)


def test_preflight_and_the_stream_share_one_dealing():
    """Preflight must check the shards the stream will read: both use pipeline.data.dealing,
    which must stay torch-free (preflight runs on login nodes in a fraction of a second)."""
    import subprocess
    import sys

    from pipeline.data import dealing, stream

    assert stream.rank_shards is dealing.rank_shards
    assert stream.stream_shards is dealing.stream_shards
    code = "import sys, pipeline.preflight; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
