"""Shard naming, shard URL expansion and the per-split index (``index.parquet``, ``sizes.json``).

A written split lives in one directory, or under one ``s3://bucket/prefix`` of an object store
(read through :mod:`pipeline.data.storage`; a prefix without ``index.parquet`` is not a split)::

    <out>/<split>/{name}-{split}-{index:06d}.tar   the shards
    <out>/<split>/index.parquet                   one row per sample, in write order
    <out>/<split>/sizes.json                      {shard file name: sample count}
    <out>/<split>/skipped.txt                     unreadable source images (path, reason)
    <out>/<split>/pairs.parquet ...               IJB-C only: its protocol tables

The *catalog row* of a sample (once called its global index) is its row position in
``index.parquet`` (also stored as the ``index`` column and in each sample's ``json``); the eval
loader yields it so that evaluators can join metadata such as IJB-C template / media ids.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import braceexpand  # webdataset's own dependency
import pyarrow.parquet as pq

from pipeline.data import storage, storage_ops

INDEX_FILE = "index.parquet"
SIZES_FILE = "sizes.json"
SKIPPED_FILE = "skipped.txt"
SHARD_SUFFIX = ".tar"
IJBC_TABLES = (
    "pairs.parquet",
    "gallery_G1.parquet",
    "gallery_G2.parquet",
    "gallery_S1.parquet",  # IJB-B's galleries
    "gallery_S2.parquet",
    "probe_mixed.parquet",
)
"""IJB-C's protocol tables, written beside its shards by ``converters.list_ijbc``."""
WRITTEN_FILES = (INDEX_FILE, SIZES_FILE, SKIPPED_FILE, *IJBC_TABLES)
"""Every file a split folder holds besides its shards: all that ``make-shards --overwrite`` may
remove (with the shards), so that a file it did not write is never deleted."""
SHARD_BYTES, SHARD_MD5 = "shard_bytes", "shard_md5"
"""Catalog columns (repeated on each row of a shard): the shard file's size and the hex MD5 of
its bytes (an object's ETag when uploaded in one part), so that a reader can check a shard
without trusting a listing. Splits written before they existed have neither."""
NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
"""Dataset and split names: they become part of file names and of the ShardWriter pattern."""


def shard_pattern(directory: str | Path, name: str, split: str) -> str:
    """The ``%``-pattern ``webdataset.ShardWriter`` fills with the shard number."""
    return str(Path(directory) / f"{name}-{split}-%06d{SHARD_SUFFIX}")


def is_shard_name(fname: str, split: str) -> bool:
    """Whether ``fname`` is named like a shard of ``split`` (``{name}-{split}-000000.tar``)."""
    name, _, rest = fname.partition("-")
    return bool(
        NAME_RE.match(name)
        and re.fullmatch(rf"{re.escape(split)}-[0-9]{{6}}{re.escape(SHARD_SUFFIX)}", rest)
    )


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid dataset / split name, else raise ValueError."""
    if not NAME_RE.match(value):
        raise ValueError(
            f"{kind} {value!r}: use letters, digits and '_' only (it becomes part of the "
            f"shard file names {{name}}-{{split}}-000000.tar)"
        )
    return value


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _is_s3_split(spec: str) -> bool:
    """An ``s3://`` spec naming a split prefix (not a brace pattern, list file or one shard)."""
    return (
        storage.is_s3(spec)
        and "{" not in spec
        and "::" not in spec
        and not spec.endswith((SHARD_SUFFIX, ".txt"))
    )


def _s3_split_urls(spec: str) -> list[str]:
    """The shards of a published split in an object store, in ``sizes.json`` order."""
    if not storage_ops.exists(storage.join(spec, INDEX_FILE)):
        storage_ops.check_bucket(spec)
        raise storage.StorageNotFound(
            f"{storage.join(spec, INDEX_FILE)} does not exist, so {spec} is not a split (a split "
            "is published by writing its catalog last); write one there with `pipeline "
            "make-shards ... --out PREFIX` or check the URL"
        )
    return [storage.join(spec, n) for n in read_sizes(spec)]


def expand_urls(spec: str) -> list[str]:
    """Expand a shard spec into a list of URLs, in a fixed order.

    ``spec`` is one of: a directory (its shards in ``sizes.json`` order, else every ``*.tar`` in
    name order), an ``s3://bucket/prefix/split`` prefix (its ``sizes.json`` order), a ``.txt`` file with one URL a line, or brace patterns
    (``dir/x-{000000..000009}.tar``) joined by ``::``, which may be any URL webdataset opens
    (``pipe:aws s3 cp s3://bucket/x-{000000..000009}.tar -``).
    Raises ValueError naming the spec when it expands to nothing or names missing local files.
    """
    if not spec:
        raise ValueError("empty shard spec: give a directory, a brace pattern or a list file")
    if _is_s3_split(spec):
        urls = _s3_split_urls(spec)
    elif not _is_remote(spec) and os.path.isdir(spec):
        sizes_path = Path(spec) / SIZES_FILE
        if sizes_path.is_file():
            names = list(read_sizes(spec))
        else:
            names = sorted(p.name for p in Path(spec).glob(f"*{SHARD_SUFFIX}"))
        urls = [str(Path(spec) / n) for n in names]
        if not urls:
            raise ValueError(
                f"shard directory {spec!r} holds no *{SHARD_SUFFIX} files; "
                "write shards there with `pipeline make-shards` or point to the split directory"
            )
    elif spec.endswith(".txt") and not _is_remote(spec):
        if not os.path.isfile(spec):
            raise ValueError(f"shard list file {spec!r} does not exist")
        base = Path(spec).parent
        urls = []
        for line in Path(spec).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                # Relative local paths in a list file are relative to the list file.
                urls.append(line if _is_remote(line) or os.path.isabs(line) else str(base / line))
    else:
        urls = []
        for part in spec.split("::"):
            urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise ValueError(
            f"shard spec {spec!r}: {len(missing)} of {len(urls)} shards do not exist "
            f"(first: {missing[0]!r}); check the path or run `pipeline make-shards`"
        )
    return urls


def split_dir(urls_or_dir: str) -> Path | storage.S3Path:
    """The directory holding ``index.parquet`` for a split directory, a parquet file or a shard
    spec (the directory of its first shard); for ``s3://`` specs the prefix (an ``S3Path``).
    Other remote specs must name the directory explicitly."""
    if storage.is_s3(urls_or_dir):
        if _is_s3_split(urls_or_dir):
            return storage.S3Path(urls_or_dir)
        if urls_or_dir.endswith(".parquet"):
            return storage.S3Path(storage.parent(urls_or_dir))
        return storage.S3Path(storage.parent(expand_urls(urls_or_dir)[0]))
    if os.path.isdir(urls_or_dir):
        return Path(urls_or_dir)
    if urls_or_dir.endswith(".parquet"):
        return Path(urls_or_dir).parent
    first = expand_urls(urls_or_dir)[0]
    if _is_remote(first):
        raise ValueError(
            f"cannot locate {INDEX_FILE} for remote shards {urls_or_dir!r}: copy the split's "
            f"{INDEX_FILE} locally and pass its directory or path"
        )
    return Path(first).parent


def read_index(urls_or_dir: str):  # -> pyarrow.Table (imported lazily)
    """Read a split's ``index.parquet`` as a ``pyarrow.Table``; row i is the sample with global
    index i (columns: index, key, shard, position, label, class_name, split, bytes, width, height,
    source, plus dataset-specific ids such as template_id / media_id, null where absent).

    ``urls_or_dir``: the split directory, the parquet file itself, or a local shard spec.
    """
    if storage.is_s3(urls_or_dir):
        spec = str(urls_or_dir)
        url = spec if spec.endswith(".parquet") else str(split_dir(spec) / INDEX_FILE)
        return pq.read_table(io.BytesIO(storage.read_bytes(url)))
    path = (
        Path(urls_or_dir)
        if str(urls_or_dir).endswith(".parquet")
        else split_dir(str(urls_or_dir)) / INDEX_FILE
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: every split written by `pipeline make-shards` has one; "
            "pass the split directory (e.g. data/synthetic/test)"
        )
    return pq.read_table(path)


def read_catalog_metadata(urls_or_dir: str) -> dict[bytes, bytes]:
    """The schema metadata of a split's ``index.parquet`` (local or ``s3://``; see
    :func:`read_index` for the argument), without reading a local file's rows."""
    spec = str(urls_or_dir)
    if storage.is_s3(spec):
        url = spec if spec.endswith(".parquet") else str(split_dir(spec) / INDEX_FILE)
        return pq.read_schema(io.BytesIO(storage.read_bytes(url))).metadata or {}
    path = Path(spec) if spec.endswith(".parquet") else split_dir(spec) / INDEX_FILE
    return pq.read_schema(path).metadata or {}


def read_sizes(directory: str | Path) -> dict[str, int]:
    """``sizes.json`` of a split directory (or ``s3://`` prefix): shard file name -> sample
    count, in shard order."""
    path = storage.join(directory, SIZES_FILE)
    if not storage.is_s3(path) and not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; was the split written by make-shards?")
    try:
        sizes = json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(sizes, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in sizes.items()
    ):
        raise ValueError(f"{path} must map shard file names to integer counts")
    return sizes
