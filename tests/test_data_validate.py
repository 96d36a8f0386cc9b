"""validate-shards: a good split passes; each kind of damage is reported with shard and key."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data.validate import validate_split


@pytest.fixture(scope="module")
def good(synthetic_split) -> Path:
    return synthetic_split(classes=6, per_class=4, samples_per_shard=8)


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "train"))


def _rewrite(shard: Path, edit) -> None:
    """Rewrite a tar, passing each (name, bytes) through ``edit`` (None drops the member)."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            out = edit(name, data)
            if out is None:
                continue
            name, data = out
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_good_split_passes(good, capsys):
    n, problems = validate_split(good)
    assert (n, problems) == (24, [])
    assert main(["validate-shards", str(good.parent), "--workers", "2"]) == 0
    assert "24 samples read, 0 problems" in capsys.readouterr().out


def test_damaged_members_are_reported_by_shard_and_key(good, tmp_path, capsys):
    split = _copy(good, tmp_path)
    shard = split / "synthetic-train-000000.tar"

    def damage(name, data):
        if name == "000000001.jpg":
            return name, data[: len(data) // 2]  # truncated JPEG
        if name == "000000002.cls":
            return None  # member missing
        if name == "000000003.cls":
            return name, b"seven"
        if name == "000000004.json":
            return name, json.dumps({**json.loads(data), "index": 99}).encode()
        if name == "000000005.cls":
            return name, b"5"  # a wrong label
        return name, data

    _rewrite(shard, damage)
    _, problems = validate_split(split)
    text = "\n".join(problems)
    assert "synthetic-train-000000.tar:000000001: jpg does not decode" in text
    assert "synthetic-train-000000.tar:000000002: members ['jpg', 'json'], expected" in text
    assert "synthetic-train-000000.tar:000000003: cls b'seven' is not an integer" in text
    assert "synthetic-train-000000.tar:000000004: json index is 99, index.parquet says 4" in text
    assert "synthetic-train-000000.tar:000000005: label (cls) is 5, index.parquet says" in text
    assert "synthetic-train-000000.tar:000000001: bytes is " in text  # the truncation, too
    # and the shard's bytes no longer match the MD5 the catalog records for it
    assert re.search(r"synthetic-train-000000.tar: MD5 [0-9a-f]{32}, index.parquet says", text)
    assert len(problems) == 7, problems
    assert main(["validate-shards", str(split)]) == 1
    assert "7 problems" in capsys.readouterr().out


def test_missing_extra_and_miscounted_shards_are_reported(good, tmp_path):
    split = _copy(good, tmp_path)
    (split / "synthetic-train-000002.tar").unlink()
    shutil.copy(split / "synthetic-train-000000.tar", split / "stray-000000.tar")
    sizes = json.loads((split / "sizes.json").read_text())
    sizes["synthetic-train-000001.tar"] += 1
    (split / "sizes.json").write_text(json.dumps(sizes))
    _rewrite(
        split / "synthetic-train-000000.tar",
        lambda name, data: None if name.startswith("000000007.") else (name, data),
    )
    _, problems = validate_split(split)
    text = "\n".join(problems)
    assert "synthetic-train-000002.tar: listed in sizes.json but missing" in text
    assert "stray-000000.tar: not listed in sizes.json" in text
    assert "synthetic-train-000001.tar: 8 samples, sizes.json says 9" in text
    assert "synthetic-train-000000.tar: 7 samples, sizes.json says 8" in text
    assert "synthetic-train-000000.tar:000000007: in index.parquet but not in the shard" in text
    assert "sizes.json counts 25 samples, index.parquet has 24" in text


def test_not_a_split_directory(tmp_path, capsys):
    assert main(["validate-shards", str(tmp_path)]) == 1
    assert "holds no split" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.tar").write_bytes(b"")
    _, problems = validate_split(tmp_path / "x")
    assert problems and "sizes.json does not exist" in problems[0]
