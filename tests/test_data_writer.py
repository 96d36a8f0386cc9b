"""Shard writing: round trip through tarfile and webdataset, index, sizes, skips and errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.catalog import expand_urls, read_index, read_sizes
from pipeline.data.items import SourceItem
from pipeline.data.writer import ShardWriteError, write_split
from tests.data_helpers import jpeg_bytes, tiny_split, write_image


def _items_on_disk(root: Path, classes: int = 5, per_class: int = 4) -> list[SourceItem]:
    items = []
    for c in range(classes):
        for i in range(per_class):
            path = write_image(root / f"c{c}" / f"{i}.jpg", 20 + i, 14 + c, seed=10 * c + i)
            items.append(
                SourceItem(
                    class_name=f"c{c}",
                    source=f"c{c}/{i}.jpg",
                    path=str(path),
                    meta={"extra_id": 100 * c + i},
                )
            )
    return items


def _tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of a tar, read with the plain tarfile module."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            key, ext = info.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tar.extractfile(info).read()
    return out


def test_round_trip_tarfile_webdataset_and_index(tmp_path):
    items = _items_on_disk(tmp_path / "src")
    summary = write_split(
        items, tmp_path / "out", name="toy", split="train", samples_per_shard=8, progress=False
    )
    split = tmp_path / "out" / "train"
    assert (summary.samples, summary.classes, summary.skipped, summary.listed) == (20, 5, 0, 20)
    sizes = read_sizes(split)
    assert list(sizes) == [f"toy-train-{i:06d}.tar" for i in range(summary.shards)]
    source_bytes = {it.source: Path(it.path).read_bytes() for it in items}
    # 1. plain tarfile
    by_tarfile = []
    for shard in sizes:
        samples = _tar_samples(split / shard)
        assert len(samples) == sizes[shard]
        for position, (key, members) in enumerate(samples):
            assert set(members) == {"jpg", "cls", "json"} and "." not in key
            by_tarfile.append((shard, position, key, members))
    # 2. webdataset, directly
    urls = expand_urls(str(split))
    by_wds = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in by_wds] == [k for _, _, k, _ in by_tarfile]
    # 3. index.parquet rows equal the samples
    rows = read_index(str(split)).to_pylist()
    assert len(rows) == len(by_tarfile) == len(by_wds) == 20
    labels = {f"c{c}": c for c in range(5)}  # sorted class names -> 0..C-1
    for i, ((shard, position, key, members), sample, row) in enumerate(
        zip(by_tarfile, by_wds, rows)
    ):
        meta = json.loads(members["json"])
        assert sample["jpg"] == members["jpg"] == source_bytes[meta["source"]]  # original bytes
        assert int(sample["cls"]) == int(members["cls"]) == labels[meta["class_name"]]
        image = Image.open(io.BytesIO(members["jpg"]))
        assert row == {
            "index": i,
            "key": key,
            "shard": shard,
            "position": position,
            "label": labels[meta["class_name"]],
            "class_name": meta["class_name"],
            "split": "train",
            "bytes": len(members["jpg"]),
            "width": image.size[0],
            "height": image.size[1],
            "source": meta["source"],
            "extra_id": meta["extra_id"],
        }
        assert meta["index"] == i and meta["dataset"] == "toy" and meta["split"] == "train"
    # classes are contiguous, in a seeded order that is not simply sorted
    order = [r["class_name"] for r in rows]
    runs = [c for j, c in enumerate(order) if j == 0 or order[j - 1] != c]
    assert sorted(runs) == sorted(set(order))
    # a class that does not fit closes the shard: no class is split (4 per class, 8 per shard)
    assert all(len({r["shard"] for r in rows if r["class_name"] == c}) == 1 for c in labels)


def test_same_seed_same_bytes_other_seed_other_class_order(tmp_path):
    a = tiny_split(tmp_path / "a", classes=8, per_class=3, seed=1)
    b = tiny_split(tmp_path / "b", classes=8, per_class=3, seed=1)
    shards = sorted(p.name for p in a.glob("*.tar"))
    assert [(a / s).read_bytes() == (b / s).read_bytes() for s in shards] == [True] * len(shards)
    rows = read_index(str(a)).to_pylist()
    other = read_index(str(tiny_split(tmp_path / "c", classes=8, per_class=3, seed=2)))
    assert [r["class_name"] for r in rows] != other.column("class_name").to_pylist()
    assert [r["label"] for r in rows] != sorted(r["label"] for r in rows)  # shuffled


def test_class_larger_than_a_shard_spans_shards(tmp_path):
    split = tiny_split(tmp_path, classes=2, per_class=7, samples_per_shard=3)
    sizes = read_sizes(split)
    assert list(sizes.values()) == [3, 3, 1, 3, 3, 1]  # never a shard mixing a split class


def test_parallel_workers_write_the_same_shards(tmp_path):
    items = _items_on_disk(tmp_path / "src", classes=3, per_class=5)
    for workers, out in ((1, "w1"), (2, "w2")):
        write_split(items, tmp_path / out, name="t", split="s", workers=workers, progress=False)
    for shard in read_sizes(tmp_path / "w1" / "s"):
        assert (tmp_path / "w1/s" / shard).read_bytes() == (tmp_path / "w2/s" / shard).read_bytes()


def test_resize_sets_the_shorter_side_and_non_jpeg_is_reencoded(tmp_path):
    png = write_image(tmp_path / "src" / "a" / "x.png", 30, 20)
    jpg = write_image(tmp_path / "src" / "a" / "y.jpg", 16, 40)
    items = [SourceItem("a", "a/x.png", str(png)), SourceItem("a", "a/y.jpg", str(jpg))]
    write_split(items, tmp_path / "o", name="t", split="r", resize=12, progress=False)
    rows = read_index(str(tmp_path / "o" / "r")).to_pylist()
    assert sorted((r["width"], r["height"]) for r in rows) == [(12, 30), (18, 12)]
    write_split(items, tmp_path / "o", name="t", split="k", progress=False)
    shard = tmp_path / "o" / "k" / "t-k-000000.tar"
    stored = {json.loads(m["json"])["source"]: m["jpg"] for _, m in _tar_samples(shard)}
    assert stored["a/y.jpg"] == jpg.read_bytes()
    assert Image.open(io.BytesIO(stored["a/x.png"])).format == "JPEG"
    assert Image.open(io.BytesIO(stored["a/x.png"])).size == (30, 20)


def test_corrupt_images_are_skipped_listed_and_counted(tmp_path):
    items = _items_on_disk(tmp_path / "src", classes=4, per_class=5)
    Path(items[3].path).write_bytes(jpeg_bytes()[:60])  # truncated JPEG
    Path(items[7].path).write_bytes(b"not an image at all")
    summary = write_split(
        items, tmp_path / "o", name="t", split="s", max_skipped_fraction=0.2, progress=False
    )
    assert (summary.samples, summary.skipped, summary.listed) == (18, 2, 20)
    report = (tmp_path / "o" / "s" / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in report) == sorted([items[3].path, items[7].path])
    sources = set(read_index(str(tmp_path / "o" / "s")).column("source").to_pylist())
    assert items[3].source not in sources and items[0].source in sources
    assert "skipped 2 of 20" in summary.line()


def test_too_many_corrupt_images_fail_and_keep_the_partial_output(tmp_path):
    items = _items_on_disk(tmp_path / "src", classes=2, per_class=5)
    for item in items[:3]:
        Path(item.path).write_bytes(b"garbage")
    with pytest.raises(
        ShardWriteError, match=r"3 of 10 images \(30.0%\).*above the limit of 1.0%.*skipped.txt"
    ):
        write_split(items, tmp_path / "o", name="t", split="s", progress=False)
    assert not (tmp_path / "o" / "s").exists()
    (partial,) = (tmp_path / "o").glob("s.partial-*")
    assert (partial / "skipped.txt").is_file()


def test_missing_listed_file_is_an_error_naming_path_and_list_line(tmp_path):
    items = _items_on_disk(tmp_path / "src", classes=2, per_class=2)
    items.append(SourceItem("c0", "c0/gone.jpg", str(tmp_path / "gone.jpg"), origin="list.txt:7"))
    with pytest.raises(ShardWriteError, match=r"gone.jpg \(listed at list.txt:7\) does not exist"):
        write_split(items, tmp_path / "o", name="t", split="s", progress=False)


def test_bad_arguments_are_refused(tmp_path):
    items = _items_on_disk(tmp_path / "src", classes=1, per_class=1)
    with pytest.raises(ShardWriteError, match="lists no images"):
        write_split([], tmp_path / "o", name="t", split="s", progress=False)
    with pytest.raises(ValueError, match=r"dataset name 'a-b'.*letters, digits and '_'"):
        write_split(items, tmp_path / "o", name="a-b", split="s", progress=False)
    with pytest.raises(ValueError, match="quality=0"):
        write_split(items, tmp_path / "o", name="t", split="s", quality=0, progress=False)
    with pytest.raises(ShardWriteError, match="no image of split 's' could be read"):
        Path(items[0].path).write_bytes(b"x")
        write_split(items, tmp_path / "o", name="t", split="s", progress=False)
