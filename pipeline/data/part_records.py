"""The parts of a make-shards array and their records: the plan and the merge's check.

The plan cuts a split's class order (the seeded order one task writes the classes in) into N
contiguous runs holding as nearly equal numbers of listed images as contiguous runs allow (the
largest part is as small as possible); same listing, seed and N: same parts, on any host. A
finished part's record ``part.json`` names its settings, its listing's digest, its classes and
its shards (sizes and SHA-256); ``check_parts`` is the merge's check of every record. Writing a
part and the merge itself are ``pipeline.data.parts``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.catalog import SIZES_FILE, read_sizes
from pipeline.data.items import SourceItem
from pipeline.data.outdir import ShardWriteError
from pipeline.data.writer import class_order

RECORD_FILE = "part.json"
RECORD_VERSION = 1
PARTS_SUFFIX = ".parts"

NOT_SETTINGS = frozenset(
    {
        "_run",
        "command",
        "root",
        "out",
        "split",
        "workers",
        "no_progress",
        "overwrite",
        "max_skipped_fraction",
        "tasks",
        "task",
        "merge",
    }
)
"""make-shards arguments that do not change what is written (where, how fast, when to fail);
every other argument is a setting all parts and the merge must share (format, name, resize,
quality, seed, shard size, the synthetic sizes, crop options...)."""


class PartsError(ShardWriteError):
    """A part cannot be written or merged; the message names the part, the problem and the fix."""


# ---------------------------------------------------------------------------- the plan


def plan_parts(counts: Sequence[int], tasks: int) -> list[range]:
    """Cut the classes (their image ``counts``, in write order) into ``tasks`` contiguous,
    non-empty runs whose largest image total is the smallest possible; deterministic."""
    if tasks < 1:
        raise ValueError(f"tasks={tasks}: must be >= 1")
    if tasks > len(counts):
        raise PartsError(
            f"--tasks {tasks}: the split has only {len(counts)} classes and a part holds whole "
            f"classes; use --tasks {len(counts)} or fewer"
        )
    low, high = max(counts), sum(counts)
    while low < high:  # the smallest capacity that greedy filling fits into `tasks` runs
        mid = (low + high) // 2
        if _runs_needed(counts, mid) <= tasks:
            high = mid
        else:
            low = mid + 1
    ranges, start = [], 0
    for part in range(tasks):
        later = tasks - part - 1  # runs still to fill: leave each at least one class
        end, total = start + 1, counts[start]
        while end < len(counts) - later and total + counts[end] <= low:
            total, end = total + counts[end], end + 1
        ranges.append(range(start, end))
        start = end
    assert start == len(counts), (counts, tasks, ranges)
    return ranges


def _runs_needed(counts: Sequence[int], capacity: int) -> int:
    runs, total = 1, 0
    for c in counts:
        if total + c > capacity:
            runs, total = runs + 1, 0
        total += c
    return runs


def class_runs(items: list[SourceItem], seed: int) -> list[list[SourceItem]]:
    """The items as one list per class, in the order one task writes them."""
    ordered, _ = class_order(items, seed)
    runs: list[list[SourceItem]] = []
    for item in ordered:
        if not runs or runs[-1][0].class_name != item.class_name:
            runs.append([])
        runs[-1].append(item)
    return runs


def listing_digest(items: Iterable[SourceItem]) -> str:
    """SHA-256 of what a listing says (class, source, ids), not where the root is mounted."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.class_name, item.source, item.meta], sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments every part and the merge must share (see ``NOT_SETTINGS``)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}


def parts_dir(out: str | Path, split: str) -> Path:
    return Path(out) / f"{split}{PARTS_SUFFIX}"


def part_dir(out: str | Path, split: str, task: int, tasks: int) -> Path:
    return parts_dir(out, split) / f"part-{task}-of-{tasks}"


def describe_part(runs: list[list[SourceItem]], span: range) -> str:
    mine = runs[span.start : span.stop]
    first, last = mine[0][0].class_name, mine[-1][0].class_name
    images = sum(len(r) for r in mine)
    if len(mine) == 1:
        return f"class {span.start} of the class order ({first!r}), {images} images"
    return (
        f"classes {span.start}..{span.stop - 1} of the class order ({first!r}..{last!r}), "
        f"{images} images"
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- the merge's check


def _flag(key: str) -> str:
    return "FORMAT" if key == "format" else "--" + key.replace("_", "-")


def _record_problem(
    record: dict[str, Any], expect: dict[str, Any], runs: list[list[SourceItem]], span: range
) -> str | None:
    """Why a parsed record does not belong to this merge, or None."""
    if record.get("version") != RECORD_VERSION:
        return f"record version {record.get('version')!r}, this make-shards writes {RECORD_VERSION}"
    theirs, ours = record.get("settings", {}), expect["settings"]
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
            return (
                f"made with other settings: {_flag(key)} {theirs.get(key)!r} there, "
                f"{ours.get(key)!r} here; re-run it with this merge's arguments (or merge with "
                "the parts' settings)"
            )
    if (record.get("split"), record.get("task"), record.get("tasks")) != expect["where"]:
        return f"its record says split {record.get('split')!r}, part {record.get('task')} of {record.get('tasks')}"
    if record.get("listing") != expect["listing"]:
        return "made from another listing of the dataset (its list files or --root changed since)"
    classes = [[run[0].class_name, len(run)] for run in runs[span.start : span.stop]]
    if record.get("classes") != classes:
        return "covers other classes than this listing's part"
    return None


def _shard_problem(folder: Path, split: str, record: dict[str, Any]) -> str | None:
    """Whether the part's split folder holds what its record lists (files and byte sizes)."""
    split_dir = folder / split
    try:
        sizes = read_sizes(split_dir)
    except (FileNotFoundError, ValueError) as e:
        return f"damaged: {e}"
    shards = record.get("shards", {})
    if sizes != {s: info["samples"] for s, info in shards.items()}:
        return f"damaged: {split_dir / SIZES_FILE} disagrees with {folder / RECORD_FILE}"
    for shard, info in shards.items():
        path = split_dir / shard
        if not path.is_file():
            return f"damaged: {path} is missing"
        if path.stat().st_size != info["bytes"]:
            return (
                f"damaged: {path} is {path.stat().st_size} bytes, its record says {info['bytes']}"
            )
    return None


def check_parts(
    items: list[SourceItem],
    out: str | Path,
    *,
    split: str,
    tasks: int,
    seed: int,
    settings: dict[str, Any],
) -> list[dict[str, Any]]:
    """The records of every part, in order, when all are finished, sound and made with
    ``settings`` from this listing; else PartsError naming each part that is not, one a line."""
    runs = class_runs(items, seed)
    plan = plan_parts([len(r) for r in runs], tasks)
    expect = {"settings": settings, "listing": listing_digest(items)}
    records, problems = [], []
    for task, span in enumerate(plan):
        folder = part_dir(out, split, task, tasks)
        path = folder / RECORD_FILE
        expect["where"] = (split, task, tasks)
        record: dict[str, Any] = {}
        if not path.is_file():
            problem = (
                f"missing: no {path} (the task did not run, is still running, or ended "
                "before finishing)"
            )
        else:
            try:
                record = json.loads(path.read_text())
                problem = _record_problem(record, expect, runs, span) or _shard_problem(
                    folder, split, record
                )
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                problem = f"damaged: {path} does not parse as a part record ({e})"
        if problem:
            problems.append(f"  part {task} ({describe_part(runs, span)}): {problem}")
        records.append(record)
    if problems:
        raise PartsError(
            f"{len(problems)} of {tasks} parts of split {split!r} under {parts_dir(out, split)} "
            "are not ready, nothing was written; re-run each with the same command and "
            "--task I instead of --merge, then merge again:\n" + "\n".join(problems)
        )
    return records
