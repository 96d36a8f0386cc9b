"""The operations on a split's objects, over ``pipeline.data.storage``'s client and retries.

Whether an object (or a local file) exists, its size and ETag, whether its bucket exists, the
objects and sub-prefixes under a prefix, and the writes a publish makes: an upload checked by its
MD5 (``md5_file``, also the catalog's per-shard check), a server-side copy and a delete. Every
request goes through ``storage.with_retries``, so a transient failure is retried, counted and
logged, and one that retrying cannot fix is a one-line ``StorageError``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from typing import Any

from pipeline.data.storage import (
    CHUNK,
    S3,
    StorageNotFound,
    client,
    is_s3,
    split_url,
    where,
    with_retries,
)

# ---------------------------------------------------------------------------- reading


def exists(url: str | os.PathLike) -> bool:
    """Whether the file or object exists (False for a missing bucket too)."""
    if not is_s3(url):
        return os.path.isfile(url)
    try:
        head(str(url))
    except StorageNotFound:
        return False
    return True


def head(url: str) -> tuple[int, str]:
    """(size in bytes, ETag without quotes) of an object."""
    bucket, key = split_url(url)
    r = with_retries("HEAD", url, lambda: client().head_object(Bucket=bucket, Key=key))
    return int(r["ContentLength"]), r["ETag"].strip('"')


def check_bucket(url: str) -> None:
    """Raise StorageNotFound naming the bucket of ``url`` when it does not exist (a HEAD of a
    missing object and of an object in a missing bucket both answer 404)."""
    bucket, _ = split_url(url)
    try:
        with_retries("HEAD", f"{S3}{bucket}", lambda: client().head_bucket(Bucket=bucket))
    except StorageNotFound:
        raise StorageNotFound(
            f"{url}: bucket {bucket!r} does not exist at {where()}; check the URL and "
            "data.storage.endpoint_url / AWS_ENDPOINT_URL, or create the bucket"
        ) from None


def list_objects(prefix: str) -> dict[str, int]:
    """Name -> size of the objects directly under ``prefix`` (not in sub-prefixes)."""
    bucket, key = split_url(prefix)
    key = key.rstrip("/") + "/" if key else ""
    out: dict[str, int] = {}
    for page in _pages(prefix, bucket, key):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(key) :]
            if name:  # not the folder marker some stores list for the prefix itself
                out[name] = int(obj["Size"])
    return out


def list_prefixes(prefix: str) -> list[str]:
    """The sub-prefixes directly under ``prefix``, as full ``s3://`` URLs (sorted)."""
    bucket, key = split_url(prefix)
    key = key.rstrip("/") + "/" if key else ""
    found = [
        f"{S3}{bucket}/{p['Prefix'].rstrip('/')}"
        for page in _pages(prefix, bucket, key)
        for p in page.get("CommonPrefixes", [])
    ]
    return sorted(found)


def _pages(url: str, bucket: str, key: str) -> Iterator[dict]:
    token: str | None = None
    while True:
        args = {"Bucket": bucket, "Prefix": key, "Delimiter": "/"}
        if token:
            args["ContinuationToken"] = token
        page = with_retries("LIST", url, lambda args=args: client().list_objects_v2(**args))
        yield page
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


# ---------------------------------------------------------------------------- writing


def md5_file(path: str | os.PathLike) -> str:
    """Hex MD5 of a local file: the ETag S3 gives an object uploaded in one part."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def put_file(path: str | os.PathLike, url: str) -> str:
    """Upload a local file as one object (one part, so its ETag is its MD5; the store checks the
    body against Content-MD5) and return that MD5."""
    bucket, key = split_url(url)
    md5 = md5_file(path)
    content_md5 = base64.b64encode(bytes.fromhex(md5)).decode()

    def put() -> Any:
        with open(path, "rb") as f:
            return client().put_object(Bucket=bucket, Key=key, Body=f, ContentMD5=content_md5)

    with_retries("PUT", url, put)
    return md5


def copy_object(src: str, dst: str) -> None:
    """Server-side copy (no bytes through this process)."""
    sb, sk = split_url(src)
    db, dk = split_url(dst)
    with_retries(
        "COPY",
        dst,
        lambda: client().copy_object(Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk}),
    )


def delete_object(url: str) -> None:
    bucket, key = split_url(url)
    with_retries("DELETE", url, lambda: client().delete_object(Bucket=bucket, Key=key))
