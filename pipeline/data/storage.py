"""Where splits live: a local (or cluster) folder, or a prefix in an S3-compatible object store.

Every read and write of a split goes through here (paths, the client, its settings and retries,
the streamed read) and ``pipeline.data.storage_ops`` (exists, head, list, upload, copy, delete,
built on this module's client and retries), so ``s3://bucket/prefix/split`` works wherever a
folder does. The client is boto3 (botocore), AWS's own maintained SDK:

- Credentials come only from AWS's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
  AWS_PROFILE, ~/.aws/credentials, instance roles); nothing here takes a secret.
- Endpoint and region: ``data.storage`` (see :func:`configure`), else AWS_ENDPOINT_URL and
  AWS_REGION / AWS_DEFAULT_REGION. With an endpoint, path-style addressing (what MinIO, Ceph and
  SeaweedFS serve without wildcard DNS).
- Clients are made per process, on first use: a DataLoader worker forked from a process that
  holds one makes its own (a botocore connection pool must not be shared across a fork), from
  the boto3 session it inherits (whose loaded service model makes that take milliseconds).
- botocore's own retries are off, so that every retry is ours: a transient failure (connection
  refused or reset, timeout, truncated body, 5xx, throttling) is retried after a wait that
  doubles, counted (:func:`read_retries`; shared with forked workers once
  :func:`share_retry_count` ran in the parent) and logged; a read interrupted mid-object resumes
  at its byte offset from the same object version (If-Match on the ETag). When the attempts
  run out the read raises :class:`StorageError` naming the object: never a silent skip, which
  would change the number of batches on one rank.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config.schema import StorageConfig
from pipeline.errors import UserError

log = logging.getLogger(__name__)

S3 = "s3://"
CHUNK = 1 << 20
"""Bytes asked of a response body at a time."""


class StorageError(UserError, OSError):
    """An object store refused or failed a request; the message names the object and the fix.

    ``__str__`` is the message alone: readers such as webdataset append context to ``args``."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and "\n" in message:
            # Re-raised by a DataLoader from its worker, with the worker's traceback: keep the
            # one line (the traceback's last line is "module.Class: message").
            where = message.split("\n", 1)[0].removeprefix("Caught ").rstrip(".")
            last = message.rstrip().rsplit("\n", 1)[-1]
            message = f"{last.split(': ', 1)[-1]} ({where.split(' in ', 1)[-1]})"
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StorageNotFound(StorageError, FileNotFoundError):
    """The object (or bucket) does not exist."""


def is_s3(url: str | os.PathLike) -> bool:
    return str(url).startswith(S3)


def join(base: str | os.PathLike, name: str) -> str:
    """``base/name`` for a folder or an ``s3://`` prefix."""
    base = str(base)
    return f"{base.rstrip('/')}/{name}" if is_s3(base) else str(Path(base) / name)


def basename(url: str | os.PathLike) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def parent(url: str | os.PathLike) -> str:
    url = str(url).rstrip("/")
    return url.rsplit("/", 1)[0] if is_s3(url) else str(Path(url).parent)


class S3Path:
    """An ``s3://`` prefix with the few path operations that callers of ``split_dir`` use
    (``/``, ``name``, ``parent``, ``resolve``); it never touches the network."""

    def __init__(self, url: str):
        if not is_s3(url):
            raise ValueError(f"{url!r} is not an s3:// URL")
        self.url = url.rstrip("/")

    def __truediv__(self, name: str) -> S3Path:
        return S3Path(join(self.url, name))

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"S3Path({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Path) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return basename(self.url)

    @property
    def parent(self) -> S3Path:
        return S3Path(parent(self.url))

    def resolve(self) -> S3Path:
        return self


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; refuses a bucket name S3 cannot have."""
    bucket, _, key = url[len(S3) :].partition("/")
    if len(bucket) < 3 or "/" in bucket or bucket != bucket.lower():
        raise StorageError(
            f"{url}: {bucket!r} is not a bucket name (3 to 63 lower-case letters, digits, '.' "
            "and '-'); write s3://BUCKET/PREFIX/SPLIT"
        )
    return bucket, key


# ---------------------------------------------------------------------------- settings, clients


@dataclass(frozen=True)
class _Settings:
    endpoint_url: str | None
    region: str | None
    read_attempts: int
    retry_wait_s: float
    retry_max_wait_s: float


_config = StorageConfig()
_clients: dict[tuple, Any] = {}
_sessions: dict[tuple, Any] = {}
_shared_retries: Any = None  # a multiprocessing.Value once share_retry_count ran
_local_retries = 0


def configure(cfg: StorageConfig) -> None:
    """Use ``cfg`` (``data.storage``) in this process and the workers it forks from now on."""
    global _config
    _config = cfg


def settings() -> _Settings:
    """The effective settings: ``data.storage``, then the standard AWS variables."""
    env = os.environ
    return _Settings(
        endpoint_url=_config.endpoint_url
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or None,
        region=_config.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        read_attempts=_config.read_attempts,
        retry_wait_s=_config.retry_wait_s,
        retry_max_wait_s=_config.retry_max_wait_s,
    )


def client() -> Any:
    """This process's S3 client for the current settings and credentials."""
    import boto3
    from botocore.config import Config

    s = settings()
    # Credentials in the environment may change (rotated keys, tests): a client per set.
    env = (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    key = (os.getpid(), s, env)
    if key not in _clients:
        config = Config(
            retries={"mode": "standard", "max_attempts": 1},  # the retries are ours, counted
            connect_timeout=5,
            read_timeout=30,
            s3={"addressing_style": "path"} if s.endpoint_url else None,
        )
        # The session (credentials, the loaded service model: most of a client's start-up) may
        # come from the parent; only the client, which holds the connections, is per process.
        if env not in _sessions:
            _sessions[env] = boto3.session.Session()
        _clients[key] = _sessions[env].client(
            "s3", endpoint_url=s.endpoint_url, region_name=s.region, config=config
        )
    return _clients[key]


def where() -> str:
    """The store the settings point at, for messages."""
    s = settings()
    return s.endpoint_url or f"AWS S3 ({s.region or 'default region'})"


# ---------------------------------------------------------------------------- errors and retries

_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
}
_CREDENTIAL_CODES = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
}


def _code(error: BaseException) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _is_transient(error: BaseException) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import (
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )

    # botocore turns urllib3's timeouts and broken bodies into its own errors; the standard
    # library's are what a body cut short raises below that.
    if isinstance(
        error,
        BotoConnectionError
        | HTTPClientError
        | IncompleteReadError
        | ResponseStreamingError
        | http.client.HTTPException
        | ConnectionError
        | TimeoutError,
    ):
        return True
    return _code(error) in _TRANSIENT_CODES


def _user_error(error: BaseException, url: str) -> StorageError:
    """A one-line StorageError for a request on ``url`` that retrying cannot fix."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    code = _code(error)
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"{url}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE with ~/.aws/credentials) in the environment"
        )
    if code in _CREDENTIAL_CODES:
        return StorageError(
            f"{url}: {where()} refused the credentials ({code}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and that they may read this bucket"
        )
    if code == "NoSuchBucket":
        return StorageNotFound(
            f"{url}: bucket {split_url(url)[0]!r} does not exist at {where()}; check the URL "
            "and data.storage.endpoint_url / AWS_ENDPOINT_URL, or create the bucket"
        )
    if code in ("NoSuchKey", "404"):
        return StorageNotFound(f"{url} does not exist at {where()}")
    if code in ("PreconditionFailed", "412"):
        return StorageError(
            f"{url} changed while it was read (its ETag moved); a split must not be rewritten "
            "while it is read: wait for the writer, then start again"
        )
    return StorageError(f"{url}: {where()} answered {code or type(error).__name__}: {error}")


def share_retry_count() -> None:
    """Make the retry count shared with the processes this one forks later (DataLoader
    workers); call in the parent before the workers start."""
    global _shared_retries
    if _shared_retries is None:
        method = "fork" if "fork" in mp.get_all_start_methods() else None
        _shared_retries = mp.get_context(method).Value("q", _local_retries)


def read_retries() -> int:
    """Transient read failures retried so far by this process (and its forked workers, see
    :func:`share_retry_count`)."""
    return int(_shared_retries.value) if _shared_retries is not None else _local_retries


def _count_retry() -> None:
    global _local_retries
    if _shared_retries is not None:
        with _shared_retries.get_lock():
            _shared_retries.value += 1
    else:
        _local_retries += 1


def with_retries(what: str, url: str, call: Callable[[], Any]) -> Any:
    """``call()`` with counted, backed-off retries of transient failures."""
    s = settings()
    attempt = 0
    while True:
        try:
            return call()
        except Exception as e:
            attempt = _after_failure(e, what, url, attempt, s)


def _after_failure(error: Exception, what: str, url: str, attempt: int, s: _Settings) -> int:
    """Wait before the next attempt (and count it), or raise the error as a StorageError."""
    if isinstance(error, StorageError):
        raise error
    if not _is_transient(error):
        raise _user_error(error, url) from None
    attempt += 1
    if attempt >= s.read_attempts:
        raise StorageError(
            f"{url}: {what} failed {attempt} times at {where()} (last: {type(error).__name__}: "
            f"{error}); a shard is never skipped (every rank must run the same steps): check "
            "the store, raise data.storage.read_attempts if it is only slow, and resume from "
            "the latest checkpoint"
        ) from None
    wait = min(s.retry_max_wait_s, s.retry_wait_s * 2 ** (attempt - 1))
    _count_retry()
    log.warning(
        "%s: %s failed (%s: %s); retry %d of %d in %.2f s",
        *(url, what, type(error).__name__, error, attempt, s.read_attempts - 1, wait),
    )
    time.sleep(wait)
    return attempt


# ---------------------------------------------------------------------------- reading


class _S3Reader(io.RawIOBase):
    """A forward-only stream of one object that survives transient failures: on one, it waits,
    counts the retry and asks again from its byte offset, pinned to the first ETag."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.bucket, self.key = split_url(url)
        self.pos = 0
        self.size: int | None = None
        self.etag: str | None = None
        self.body: Any = None
        self.attempt = 0
        self._open()  # a missing object or bad credentials fail here, not at the first read

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        def get() -> Any:
            extra: dict[str, str] = {}
            if self.etag is not None:
                extra = {"IfMatch": self.etag, "Range": f"bytes={self.pos}-"}
            return client().get_object(Bucket=self.bucket, Key=self.key, **extra)

        response = with_retries("GET", self.url, get)
        if self.etag is None:
            self.etag, self.size = response["ETag"], int(response["ContentLength"])
        self.body = response["Body"]

    def readinto(self, buffer: Any) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        view = memoryview(buffer).cast("B")
        while True:
            try:
                if self.body is None:
                    self._open()
                data = self.body.read(min(len(view), CHUNK))
                if not data:
                    raise ConnectionError(f"the body ended at byte {self.pos} of {self.size}")
                view[: len(data)] = data
                self.pos += len(data)
                self.attempt = 0
                return len(data)
            except Exception as e:
                self._drop_body()
                self.attempt = _after_failure(e, "read", self.url, self.attempt, settings())

    def _drop_body(self) -> None:
        if self.body is not None:
            with contextlib.suppress(Exception):
                self.body.close()
        self.body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_read(url: str | os.PathLike) -> io.BufferedReader:
    """A buffered binary stream of a local file or an object (read forward, retried)."""
    if is_s3(url):
        return io.BufferedReader(_S3Reader(str(url)), buffer_size=CHUNK)
    return open(url, "rb")


def read_bytes(url: str | os.PathLike) -> bytes:
    with open_read(url) as f:
        return f.read()
