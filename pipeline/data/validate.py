"""``pipeline validate-shards DIR``: read every shard of a split and report every problem.

Checked, per sample: members are exactly ``jpg``, ``cls``, ``json`` (so the key has no dot);
``cls`` is an integer; ``json`` parses and agrees (index, class name, split); the image decodes
completely; key, shard, position, label, byte size, width and height agree with
``index.parquet``. Per split: shard counts equal ``sizes.json``; every shard listed exists and
every ``*.tar`` is listed; index rows equal the samples (row i has index i, keys unique, no
row without its sample); each class is one contiguous run (training relies on it).

The shards are read with Python's ``tarfile`` module, independently of the webdataset reader
that training uses. Where the catalog records each shard's size and MD5 (splits written since
they were added), the bytes read are checked against them, so a split in an object store
(``s3://bucket/prefix/split``) is checked without trusting the store's listing. Exit code 1
when there is any problem.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import sys
import tarfile
from pathlib import Path

from PIL import Image

from pipeline.data import storage, storage_ops
from pipeline.data.catalog import (
    INDEX_FILE,
    SHARD_BYTES,
    SHARD_MD5,
    SHARD_SUFFIX,
    SIZES_FILE,
    read_index,
    read_sizes,
)
from pipeline.data.faces import describe, split_crop

MEMBERS = {"jpg", "cls", "json"}
MAX_PRINTED = 200


def _check_sample(shard: str, key: str, members: dict[str, bytes], row: dict | None) -> list[str]:
    where = f"{shard}:{key}"
    problems = []
    if set(members) != MEMBERS:
        problems.append(
            f"{where}: members {sorted(members)}, expected {sorted(MEMBERS)} "
            "(a dot in a key splits it into a wrong extension)"
        )
    label = meta = None
    if "cls" in members:
        try:
            label = int(members["cls"])
        except ValueError:
            problems.append(f"{where}: cls {members['cls'][:20]!r} is not an integer")
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError as e:
            problems.append(f"{where}: json does not parse ({e})")
            meta = None
    size = None
    if "jpg" in members:
        try:
            image = Image.open(io.BytesIO(members["jpg"]))
            image.load()
            size = image.size
        except Exception as e:
            problems.append(f"{where}: jpg does not decode ({type(e).__name__}: {e})")
    if row is None:
        return [*problems, f"{where}: no row with this key in {INDEX_FILE}"]
    expect = {
        "shard": (shard, row["shard"]),
        "label (cls)": (label, row["label"]),
        "bytes": (len(members["jpg"]) if "jpg" in members else None, row["bytes"]),
    }
    if size is not None:
        expect["width x height"] = (size, (row["width"], row["height"]))
    if meta is not None:
        expect["json index"] = (meta.get("index"), row["index"])
        expect["json class_name"] = (meta.get("class_name"), row["class_name"])
        expect["json split"] = (meta.get("split"), row["split"])
    for what, (got, want) in expect.items():
        if got != want and got is not None:
            problems.append(f"{where}: {what} is {got!r}, {INDEX_FILE} says {want!r}")
    return problems


class _Digest:
    """A read-only stream that counts and hashes what is read through it."""

    def __init__(self, stream: io.BufferedIOBase):
        self.stream, self.size = stream, 0
        self.md5 = hashlib.md5(usedforsecurity=False)

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.md5.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(storage.CHUNK):
            pass


def _size_and_md5_problems(name: str, digest: _Digest, rows: dict[str, dict]) -> list[str]:
    row = next(iter(rows.values()), {})
    want_size, want_md5 = row.get(SHARD_BYTES), row.get(SHARD_MD5)
    problems = []
    if want_size is not None and digest.size != want_size:
        problems.append(f"{name}: {digest.size} bytes, {INDEX_FILE} says {want_size}")
    elif want_md5 is not None and digest.md5.hexdigest() != want_md5:
        problems.append(
            f"{name}: MD5 {digest.md5.hexdigest()}, {INDEX_FILE} says {want_md5} (the shard "
            "changed after it was written: rewrite or re-copy it)"
        )
    return problems


def check_shard(path: str, rows: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(keys in order, problems) of one shard (a file or an ``s3://`` object), read with
    ``tarfile``; its bytes are checked against the catalog's size and MD5 where it has them."""
    name = storage.basename(path)
    keys: list[str] = []
    key_set: set[str] = set()
    problems: list[str] = []
    current: str | None = None
    members: dict[str, bytes] = {}

    def flush() -> None:
        if current is not None:
            row = rows.get(current)
            if row is not None and row["position"] != len(keys):
                problems.append(
                    f"{name}:{current}: at position {len(keys)}, "
                    f"{INDEX_FILE} says {row['position']}"
                )
            keys.append(current)
            key_set.add(current)
            problems.extend(_check_sample(name, current, members, row))

    try:
        source = storage.open_read(path)
    except (storage.StorageError, OSError) as e:
        return keys, [f"{name}: unreadable ({e})"]
    digest = _Digest(source)
    try:
        with source, tarfile.open(fileobj=digest, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    problems.append(f"{name}:{info.name}: not a regular file")
                    continue
                base = info.name.rsplit("/", 1)[-1]
                key_part, _, ext = base.partition(".")
                key = info.name[: len(info.name) - len(base)] + key_part
                if key != current:
                    if key in key_set:
                        problems.append(f"{name}:{key}: members not adjacent or key repeated")
                    flush()
                    current, members = key, {}
                if ext in members:
                    problems.append(f"{name}:{key}: member {ext!r} appears twice")
                members[ext] = tar.extractfile(info).read()
            flush()
            digest.drain()  # the tar's end blocks too: the whole file is hashed
        problems.extend(_size_and_md5_problems(name, digest, rows))
    except storage.StorageError as e:
        problems.append(f"{name}: unreadable ({e})")
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: unreadable tar ({type(e).__name__}: {e})")
    return keys, problems


def _check_shard_star(args: tuple[str, dict]) -> tuple[list[str], list[str]]:
    return check_shard(*args)


def _listed_shards(directory: str | Path) -> set[str]:
    """The shard names found in a split folder, or listed under an ``s3://`` prefix."""
    if storage.is_s3(directory):
        return {n for n in storage_ops.list_objects(str(directory)) if n.endswith(SHARD_SUFFIX)}
    return {p.name for p in Path(directory).glob(f"*{SHARD_SUFFIX}")}


def validate_split(directory: str | Path, workers: int = 1) -> tuple[int, list[str]]:
    """(samples read, problems) of one split directory or ``s3://`` prefix."""
    directory = directory if storage.is_s3(directory) else Path(directory)
    try:
        sizes = read_sizes(directory)
        table = read_index(storage.join(directory, INDEX_FILE))
        on_disk = _listed_shards(directory)
    except (FileNotFoundError, ValueError, storage.StorageError) as e:
        return 0, [f"{directory}: {e}"]
    rows_list = table.to_pylist()
    rows, problems = _rows_by_key(rows_list)
    jobs = _shard_jobs(directory, sizes, rows, on_disk, problems)
    seen: set[str] = set()
    for (path, _), (keys, shard_problems) in zip(jobs, _check_shards(jobs, workers)):
        shard = storage.basename(path)
        problems.extend(shard_problems)
        if len(keys) != sizes[shard]:
            problems.append(f"{shard}: {len(keys)} samples, {SIZES_FILE} says {sizes[shard]}")
        seen.update(keys)
    missing = [k for k, r in rows.items() if k not in seen and r["shard"] in on_disk]
    for key in missing[:MAX_PRINTED]:
        problems.append(f"{rows[key]['shard']}:{key}: in {INDEX_FILE} but not in the shard")
    if sum(sizes.values()) != len(rows_list):
        problems.append(
            f"{SIZES_FILE} counts {sum(sizes.values())} samples, {INDEX_FILE} has {len(rows_list)}"
        )
    problems.extend(_class_contiguity_problems(rows_list))
    return len(seen), problems


def _rows_by_key(rows_list: list[dict]) -> tuple[dict[str, dict], list[str]]:
    """(index rows by key, problems): the index column counts rows, keys are unique."""
    problems: list[str] = []
    rows: dict[str, dict] = {}
    for i, row in enumerate(rows_list):
        if row.get("index") != i:
            problems.append(f"{INDEX_FILE} row {i}: index column is {row.get('index')!r}")
        if row["key"] in rows:
            problems.append(f"{INDEX_FILE} row {i}: key {row['key']!r} appears twice")
        rows[row["key"]] = row
    return rows, problems


def _shard_jobs(
    directory: str | Path,
    sizes: dict[str, int],
    rows: dict[str, dict],
    on_disk: set[str],
    problems: list[str],
) -> list[tuple[str, dict[str, dict]]]:
    """(shard path, its index rows) of each listed shard on disk; shards on disk but not listed
    and listed but missing go to ``problems``."""
    for extra in sorted(on_disk - set(sizes)):
        problems.append(f"{extra}: not listed in {SIZES_FILE}")
    jobs = []
    for shard in sizes:
        if shard not in on_disk:
            problems.append(f"{shard}: listed in {SIZES_FILE} but missing")
        else:
            shard_rows = {k: r for k, r in rows.items() if r["shard"] == shard}
            jobs.append((storage.join(directory, shard), shard_rows))
    return jobs


def _check_shards(
    jobs: list[tuple[str, dict[str, dict]]], workers: int
) -> list[tuple[list[str], list[str]]]:
    """:func:`check_shard` of each job, in order, in up to ``workers`` processes."""
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            return pool.map(_check_shard_star, jobs)
    return [check_shard(*job) for job in jobs]


def _class_contiguity_problems(rows_list: list[dict]) -> list[str]:
    """One problem per class whose rows are not one contiguous run (the P x K batching of
    :mod:`pipeline.data.pk` reads a class-contiguous stream)."""
    first: dict[int, int] = {}
    count: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, row in enumerate(rows_list):
        first.setdefault(row["label"], i)
        last[row["label"]] = i
        count[row["label"]] = count.get(row["label"], 0) + 1
    return [
        f"{INDEX_FILE}: class {label} is not contiguous (rows {first[label]}..."
        f"{last[label]} hold {count[label]} of its samples); rewrite with make-shards"
        for label in first
        if last[label] - first[label] + 1 != count[label]
    ]


def split_dirs(path: str | Path) -> list[Path] | list[str]:
    """The split directories at ``path``: itself if it holds sizes.json, else its children.
    For an ``s3://`` prefix: itself if it holds a catalog, else its sub-prefixes that do."""
    if storage.is_s3(path):
        if storage_ops.exists(storage.join(path, INDEX_FILE)):
            return [str(path).rstrip("/")]
        return [
            p
            for p in storage_ops.list_prefixes(str(path))
            if storage_ops.exists(storage.join(p, INDEX_FILE))
        ]
    path = Path(path)
    if (path / SIZES_FILE).is_file() or any(path.glob(f"*{SHARD_SUFFIX}")):
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / SIZES_FILE).is_file())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir",
        help="a split directory (OUT/SPLIT) or a dataset directory (OUT); or an s3:// prefix "
        "of either (endpoint and region from AWS_ENDPOINT_URL, AWS_REGION)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes reading shards")


def run(args: argparse.Namespace) -> int:
    if not storage.is_s3(args.dir) and not Path(args.dir).is_dir():
        print(f"validate-shards: {args.dir} is not a directory", file=sys.stderr)
        return 1
    try:
        dirs = split_dirs(args.dir)
    except storage.StorageError as e:
        print(f"validate-shards: {e}", file=sys.stderr)
        return 1
    if not dirs:
        print(
            f"validate-shards: {args.dir} holds no split ({SIZES_FILE} + shards); "
            "pass OUT or OUT/SPLIT of `pipeline make-shards`",
            file=sys.stderr,
        )
        return 1
    failed = False
    for d in dirs:
        n, problems = validate_split(d, workers=args.workers)
        for p in problems[:MAX_PRINTED]:
            print(f"{d}/{p}")
        if len(problems) > MAX_PRINTED:
            print(f"{d}: ... and {len(problems) - MAX_PRINTED} more problems")
        crop = split_crop(str(d)) or {}
        print(
            f"{d}: {n} samples read, {len(problems)} problems; face crop: {describe(crop)} "
            f"{json.dumps(crop, sort_keys=True)}"
        )
        failed |= bool(problems)
    return 1 if failed else 0
