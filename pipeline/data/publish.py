"""The output side of ``make-shards --out s3://bucket/prefix``: publishing a split in an object
store, which has no rename.

A split is first written and validated on local disk (``writer.write_split``, in a temporary
folder), then:

1. every file but the catalog is uploaded under a fresh ``<out>/<split>.partial-XXXXXXXX/``
   prefix, each in one part with its Content-MD5 (the store refuses a body that does not match);
2. that prefix is validated: every shard the catalog names is there with the catalog's size and
   an ETag equal to its MD5;
3. (``--overwrite``) the old split's catalog is deleted first, so that the old split stops being
   one before any of its objects changes;
4. the objects are copied server-side to ``<out>/<split>/`` and checked again; old objects that
   the new split does not have are deleted (only names make-shards writes);
5. the catalog (``index.parquet``) is written last: only now is the prefix a split;
6. the temporary prefix is deleted.

A run that fails before step 5 leaves no split behind (and names the temporary prefix).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.data import storage, storage_ops
from pipeline.data.catalog import (
    INDEX_FILE,
    SHARD_BYTES,
    SHARD_MD5,
    WRITTEN_FILES,
    is_shard_name,
)
from pipeline.data.outdir import ShardWriteError


def _owned(name: str, split: str) -> bool:
    return name in WRITTEN_FILES or is_shard_name(name, split)


def check_s3_output(out: str, split: str, *, overwrite: bool) -> None:
    """Refuse to write ``<out>/<split>`` when that would lose something, before any work: an
    existing split without ``overwrite``, or an object there that make-shards does not write.
    Also proves that the bucket exists and the credentials may list it."""
    final = storage.join(out, split)
    try:
        names = storage_ops.list_objects(final)
    except storage.StorageError as e:
        raise ShardWriteError(f"--out {out}: {e}") from None
    if not names:
        return
    if not overwrite:
        raise ShardWriteError(
            f"{final} already holds {len(names)} object(s); pass --overwrite to replace the "
            "split (only what make-shards writes is removed), or choose another --out"
        )
    foreign = sorted(n for n in names if not _owned(n, split))
    if foreign:
        raise ShardWriteError(
            f"{storage.join(final, foreign[0])} was not written by make-shards; --overwrite only "
            f"removes shards <name>-{split}-NNNNNN.tar and {', '.join(WRITTEN_FILES)}: move it "
            "away, or choose another --out"
        )


def _expected(local: Path) -> dict[str, tuple[int, str]]:
    """Shard name -> (bytes, MD5) from the local catalog."""
    table = pq.read_table(local / INDEX_FILE, columns=["shard", SHARD_BYTES, SHARD_MD5])
    rows = zip(*(table.column(c).to_pylist() for c in ("shard", SHARD_BYTES, SHARD_MD5)))
    return {shard: (size, md5) for shard, size, md5 in rows}


def check_objects(prefix: str, expected: dict[str, tuple[int, str]]) -> list[str]:
    """Problems of the shards under ``prefix`` against the catalog's sizes and MD5s (by a
    HEAD of each, not by the listing)."""
    problems = []
    for shard, (size, md5) in expected.items():
        url = storage.join(prefix, shard)
        try:
            got_size, etag = storage_ops.head(url)
        except storage.StorageNotFound:
            problems.append(f"{url}: missing")
            continue
        if (got_size, etag) != (size, md5):
            problems.append(
                f"{url}: {got_size} bytes, ETag {etag}; the catalog says {size} bytes, MD5 {md5}"
            )
    return problems


def publish_split(local: str | Path, out: str, split: str, *, overwrite: bool) -> str:
    """Upload the complete, validated local split folder ``local`` as ``<out>/<split>`` (steps
    in the module doc) and return its URL. Raises ShardWriteError naming what failed."""
    local = Path(local)
    final = storage.join(out, split)
    staging = storage.join(out, f"{split}.partial-{secrets.token_hex(4)}")
    expected = _expected(local)
    names = sorted(n for n in os.listdir(local) if n != INDEX_FILE)
    try:
        for name in names:
            storage_ops.put_file(local / name, storage.join(staging, name))
        _refuse(check_objects(staging, expected), staging, "uploaded")
        old = storage_ops.list_objects(final) if overwrite else {}
        if INDEX_FILE in old:
            storage_ops.delete_object(storage.join(final, INDEX_FILE))
        for name in names:
            storage_ops.copy_object(storage.join(staging, name), storage.join(final, name))
        _refuse(check_objects(final, expected), staging, "copied")
        for name in sorted(set(old) - set(names) - {INDEX_FILE}):
            if _owned(name, split):
                storage_ops.delete_object(storage.join(final, name))
        storage_ops.put_file(local / INDEX_FILE, storage.join(final, INDEX_FILE))
    except storage.StorageError as e:
        raise ShardWriteError(
            f"publishing {final} failed: {e} (no catalog was written, so no split is there; "
            f"objects may be left under {staging}/)"
        ) from None
    for name in names:
        storage_ops.delete_object(storage.join(staging, name))
    return final


def _refuse(problems: list[str], staging: str, what: str) -> None:
    if problems:
        raise storage.StorageError(
            f"{len(problems)} shard(s) {what} do not match the catalog (first: {problems[0]}); "
            f"the store lost or changed them: check it and run make-shards again ({staging})"
        )
