"""The queue between the MLflow tracker and its store, so that a tracking outage never stops
training.

Records are plain JSON-able dicts, one per tracker call, so that the same record can wait
in memory, spill to disk, go into the undelivered file and be read back by the upload
command:

- ``{"kind": "metrics", "step": 12, "timestamp": 1700000000000, "values": {"train/loss": 0.4}}``
- ``{"kind": "params", "values": {"optim.lr": "1e-05"}}``
- ``{"kind": "tags", "values": {"world_size": "2"}}``
- ``{"kind": "artifact", "path": "/abs/file", "artifact_path": "eval"}`` (``null``: the root)
- ``{"kind": "status", "status": "FINISHED", "end_time": 1700000000000}``

The undelivered file adds a ``{"kind": "header", "version": 1, "tracking_uri": ..., "run_id":
...}`` line before each group of records it receives; a record the store rejected carries
an ``"error"``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pipeline.rundir import RunDir

# Records held in memory; past it the queue spills to a file (a long outage on a long run).
MAX_QUEUED = 10_000
# The longest pause between two tries of a failed send (back-off from 0.5 s, doubling).
RETRY_MAX_S = 10.0
_SPOOL_VERSION = 1
# MLflow's per-call limits (log_batch); a chunk the thread sends is cut to fit them.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_CHUNK_RECORDS = 200
_TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})


def is_transient(e: BaseException) -> bool:
    """Worth retrying: the store did not answer (MLflow reports a refused connection or a
    timeout as a 500), is overloaded or restarting (408, 429, 502-504). Any other answer is
    a rejection that a retry would repeat."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.get_http_status_code() in _TRANSIENT_HTTP
    return not isinstance(e, (ValueError, TypeError, KeyError, FileNotFoundError))


def reason(e: BaseException) -> str:
    """The useful end of a requests/urllib3 error chain: 'Connection refused', 'timed out'."""
    text = str(e)
    found = re.findall(r"\[Errno -?\d+\] ([^'\")]+)|(Read timed out|timed out)", text)
    if found:
        return found[-1][0] or found[-1][1]
    return text.splitlines()[0][:200] if text else type(e).__name__


def now_ms() -> int:
    return int(time.time() * 1000)


def deliver(client: Any, run_id: str, records: list[dict[str, Any]]) -> None:
    """Send ``records`` to ``run_id`` in order, in as few calls as MLflow's limits allow.

    Idempotent, so a chunk may be sent again after a failure that hid a success: a metric
    with the same (key, step, timestamp, value) is stored once; an equal param is accepted;
    tags, artifacts and the status are overwritten with the same values."""
    from mlflow.entities import Metric, Param, RunTag

    metrics: list[Metric] = []
    params: list[Param] = []
    tags: dict[str, str] = {}

    def send_batch() -> None:
        for i in range(0, len(params), _MAX_PARAMS):
            client.log_batch(run_id, params=params[i : i + _MAX_PARAMS])
        for i in range(0, len(metrics), _MAX_METRICS):
            client.log_batch(run_id, metrics=metrics[i : i + _MAX_METRICS])
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_TAGS):
            client.log_batch(run_id, tags=items[i : i + _MAX_TAGS])
        metrics.clear(), params.clear(), tags.clear()

    for record in records:
        kind = record["kind"]
        if kind == "metrics":
            step, ts = record["step"], record["timestamp"]
            metrics.extend(Metric(k, v, ts, step) for k, v in record["values"].items())
        elif kind == "params":
            params.extend(Param(k, v) for k, v in record["values"].items())
        elif kind == "tags":
            tags.update(record["values"])  # a later value of a tag replaces an earlier one
        else:
            send_batch()  # what came before is sent before the artifact or the status
            if kind == "artifact":
                client.log_artifact(run_id, record["path"], record["artifact_path"])
            elif kind == "status":
                client.set_terminated(run_id, record["status"], record["end_time"])
            else:
                raise ValueError(f"unknown tracking record kind {kind!r}")
    send_batch()


def write_undelivered(
    records: list[dict[str, Any]], directory: Path | None, uri: str, run_id: str
) -> Path:
    """Append a header line and ``records`` (JSON lines) to the undelivered file of the run
    directory ``directory`` (``RunDir.undelivered``; a temporary file without one). Appending
    keeps the records of an earlier attempt of the same run directory."""
    path = None
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = RunDir(directory).undelivered
            path.open("a").close()
        except OSError as e:
            # Called while a run ends (often in a `finally`): a temporary file, not a crash.
            print(f"[tracking] cannot write to {directory} ({e})", file=sys.stderr)
            path = None
    if path is None:
        fd, name = tempfile.mkstemp(prefix=f"mlflow-undelivered-{run_id}-", suffix=".jsonl")
        os.close(fd)
        path = Path(name)
    header = {"kind": "header", "version": _SPOOL_VERSION, "tracking_uri": uri, "run_id": run_id}
    with path.open("a") as f:
        for record in [header, *records]:
            f.write(json.dumps(record) + "\n")
    return path.resolve()


class Outbox:
    """Records on their way to the store, delivered in order by one daemon thread.

    :meth:`put` never waits for the network. In memory it holds ``max_queued`` records;
    past that, new records are appended to a spill file (JSON lines) and read back in order
    once memory is drained, so that a long outage costs disk, not memory, and nothing is
    dropped. A failed send keeps its chunk and is retried after a back-off (0.5 s doubling
    to ``retry_max_s``) until it goes through; a chunk the store rejects (4xx) is resent one
    record at a time, and a record rejected alone is reported and kept for the undelivered
    file. Order: in flight < memory < spill file (while the file has records, new ones go
    after them, to the file).
    """

    def __init__(
        self,
        deliver: Callable[[list[dict[str, Any]]], None],
        *,
        name: str,
        max_queued: int,
        spill_dir: Path | None,
        retry_max_s: float,
        label: str,
    ) -> None:
        self._deliver = deliver
        self._max_queued = max_queued
        self._spill_dir = spill_dir
        self._retry_max_s = retry_max_s
        self._label = label
        self._cond = threading.Condition()
        self._inflight: list[dict[str, Any]] = []
        self._memory: deque[dict[str, Any]] = deque()
        self._spill: tuple[Path, IO[str], IO[str]] | None = None  # path, writer, reader
        self._spilled = 0  # records in the spill file not yet taken
        self._singles = 0  # records to send one by one (isolating a rejected one)
        self._rejected: list[dict[str, Any]] = []
        self._kicked = False
        self._closed = False
        self.outage_since: float | None = None
        threading.Thread(target=self._run, name=name, daemon=True).start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._inflight) + len(self._memory) + self._spilled

    def put(self, record: dict[str, Any]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"tracking record {record['kind']!r} after finish()")
            if self._spilled or len(self._memory) >= self._max_queued:
                self._spill_one(record)
            else:
                self._memory.append(record)
            self._cond.notify_all()

    def _spill_one(self, record: dict[str, Any]) -> None:
        if self._spill is None:
            try:
                fd, name = tempfile.mkstemp(
                    prefix="mlflow-queue-", suffix=".jsonl", dir=self._spill_dir
                )
            except OSError as e:
                # Memory rather than loss: the bound is there to save memory, not records.
                print(f"[tracking] cannot spill the queue to disk ({e})", file=sys.stderr)
                self._memory.append(record)
                return
            self._spill = (Path(name), os.fdopen(fd, "w"), open(name))  # noqa: SIM115
            print(
                f"[tracking] more than {self._max_queued} records wait for {self._label}: "
                f"the newest go to {name} until it answers",
                file=sys.stderr,
            )
        writer = self._spill[1]
        writer.write(json.dumps(record) + "\n")
        writer.flush()
        self._spilled += 1

    def _take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` records (lock held): from memory, else from the spill file."""
        if self._memory:
            return [self._memory.popleft() for _ in range(min(n, len(self._memory)))]
        taken = []
        if self._spill is not None:
            while self._spilled and len(taken) < n:
                taken.append(json.loads(self._spill[2].readline()))
                self._spilled -= 1
            if not self._spilled:
                self._drop_spill()
        return taken

    def _drop_spill(self) -> None:
        if self._spill is not None:
            path, writer, reader = self._spill
            writer.close(), reader.close()
            path.unlink(missing_ok=True)
            self._spill = None

    def _run(self) -> None:
        delay = 0.5
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closed or self._inflight or self._memory or self._spilled
                )
                if self._closed:
                    return
                if not self._inflight:
                    self._inflight = self._take(1 if self._singles else _CHUNK_RECORDS)
                chunk = self._inflight
            try:
                self._deliver(chunk)
            except Exception as e:
                if is_transient(e):
                    with self._cond:
                        if self.outage_since is None:
                            self.outage_since = time.monotonic()
                            print(
                                f"[tracking] {self._label} does not answer ({reason(e)}): "
                                "training goes on; records are kept and retried",
                                file=sys.stderr,
                            )
                        # A kick (flush, finish) cuts the wait short and restarts the
                        # back-off: whoever waits for the queue should not wait 10 s more.
                        self._cond.wait_for(lambda: self._kicked or self._closed, delay)
                        delay = 0.5 if self._kicked else min(2 * delay, self._retry_max_s)
                        self._kicked = False
                    continue
                with self._cond:
                    if len(chunk) > 1:  # find the culprit: resend this chunk one by one
                        self._memory.extendleft(reversed(chunk))
                        self._singles = len(chunk)
                    else:
                        print(
                            f"[tracking] {self._label} rejected a {chunk[0]['kind']} record "
                            f"({reason(e)}); it is kept for the undelivered file",
                            file=sys.stderr,
                        )
                        self._rejected.append({**chunk[0], "error": reason(e)})
                        self._singles = max(0, self._singles - 1)
                    self._inflight = []
                    self._cond.notify_all()
                continue
            with self._cond:
                if self._closed:
                    return  # close() has taken this chunk for the file already
                self._inflight = []
                self._singles = max(0, self._singles - len(chunk))
                if self.outage_since is not None:
                    print(
                        f"[tracking] {self._label} answers again after "
                        f"{time.monotonic() - self.outage_since:.0f} s; delivering the "
                        f"{len(self._memory) + self._spilled} queued records",
                        file=sys.stderr,
                    )
                    self.outage_since = None
                delay = 0.5
                self._cond.notify_all()

    def _idle(self) -> bool:
        return not (self._inflight or self._memory or self._spilled)

    def wait_empty(self, timeout_s: float) -> bool:
        """Retry now (no back-off wait) and wait up to ``timeout_s`` for the queue to empty."""
        with self._cond:
            self._kicked = True
            self._cond.notify_all()
            return self._cond.wait_for(self._idle, timeout_s)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every undelivered record, in order (rejected ones first), the queue untouched."""
        with self._cond:
            spilled = []
            if self._spill is not None:
                with open(self._spill[0]) as f:
                    lines = f.readlines()
                spilled = [json.loads(line) for line in lines[len(lines) - self._spilled :]]
            return [*self._rejected, *self._inflight, *self._memory, *spilled]

    def close(self, timeout_s: float) -> list[dict[str, Any]]:
        """Wait up to ``timeout_s`` for the queue, stop the thread, and return what is left."""
        self.wait_empty(timeout_s)
        with self._cond:  # one hold: the thread cannot take a record between the two
            left = self.snapshot()
            self._closed = True
            self._drop_spill()
            self._cond.notify_all()
        return left
