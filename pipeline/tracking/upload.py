"""``python -m pipeline.tracking upload FILE``: deliver the records a run could not deliver
(written by :meth:`pipeline.tracking.mlflow.MlflowTracker.finish`) to its MLflow run, exactly once."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.tracking.base import TrackingUnavailable
from pipeline.tracking.mlflow import (
    _UPLOAD_HTTP_DEFAULTS,
    _bound_http_requests,
    _is_http,
    _unavailable_message,
)
from pipeline.tracking.outbox import (
    deliver,
    is_transient,
    reason,
)


def upload(path: str | Path, uri: str | None = None) -> int:
    """Deliver an undelivered file (written by :meth:`MlflowTracker.finish`) to its run.

    Idempotent: metric (key, step) pairs already in the run, params it already has and
    artifacts already uploaded are skipped, so the command can be run again after a failure.
    ``uri`` overrides the file's tracking URI (a store that moved). Returns the number of
    records that could not be delivered (0: all are in the store)."""
    from mlflow import MlflowClient

    path = Path(path)
    segments: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            record = json.loads(line)
            if record["kind"] == "header":
                segments.append((record, []))
            elif not segments:
                raise ValueError(f"{path}:{n}: no header line before the first record")
            else:
                segments[-1][1].append(record)
    failed = 0
    for header, records in segments:
        target = uri or header["tracking_uri"]
        if _is_http(target):
            _bound_http_requests(_UPLOAD_HTTP_DEFAULTS)
        client = MlflowClient(tracking_uri=target)
        run_id = header["run_id"]
        try:
            run = client.get_run(run_id)
        except Exception as e:
            if _is_http(target) and is_transient(e):
                raise TrackingUnavailable(_unavailable_message(target, e)) from None
            raise
        stored: dict[str, set[int]] = {}  # key -> steps in the run, read once per key
        counts = {"sent": 0, "skipped": 0}
        for record in records:
            record = _unsent_part(client, run, record, stored, counts)
            if record is None:
                continue
            try:
                deliver(client, run_id, [record])
                counts["sent"] += 1
            except Exception as e:
                failed += 1
                print(f"{path}: {record['kind']} record not delivered: {reason(e)}")
        print(
            f"run {run_id} at {target}: {counts['sent']} records delivered, "
            f"{counts['skipped']} already there"
        )
    return failed


def _unsent_part(
    client: Any,
    run: Any,
    record: dict[str, Any],
    stored: dict[str, set[int]],
    counts: dict[str, int],
) -> dict[str, Any] | None:
    """``record`` less what the run already holds; None if it holds all of it."""
    record = {k: v for k, v in record.items() if k != "error"}
    kind, run_id = record["kind"], run.info.run_id
    if kind == "metrics":
        values = {}
        for key, value in record["values"].items():
            if key not in stored:
                stored[key] = {m.step for m in client.get_metric_history(run_id, key)}
            if record["step"] not in stored[key]:
                values[key] = value
                stored[key].add(record["step"])
        if not values:
            counts["skipped"] += 1
            return None
        return {**record, "values": values}
    if kind == "params":
        values = {k: v for k, v in record["values"].items() if k not in run.data.params}
        if not values:
            counts["skipped"] += 1
            return None
        return {**record, "values": values}
    if kind == "artifact":
        folder = record["artifact_path"]
        there = {a.path for a in client.list_artifacts(run_id, folder)}
        name = Path(record["path"]).name
        if (f"{folder}/{name}" if folder else name) in there:
            counts["skipped"] += 1
            return None
    return record  # tags and the status: setting them again changes nothing


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.tracking upload FILE [--uri URI]``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("upload", help="deliver an undelivered file to its MLflow run")
    up.add_argument(
        "file", help="a run directory's mlflow_undelivered.jsonl, written when the run ended"
    )
    up.add_argument("--uri", help="tracking URI to use instead of the one in the file")
    args = parser.parse_args(argv)
    try:
        failed = upload(args.file, args.uri)
    except (TrackingUnavailable, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
