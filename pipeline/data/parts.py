"""make-shards over many tasks: convert one part of a split's classes, then merge the parts.

``pipeline make-shards ... --tasks N --task I`` converts part I (0..N-1) of each split: a
contiguous run of the split's class order (the seeded order one task writes the classes in),
the runs cut so that the parts hold as nearly equal numbers of listed images as contiguous runs
allow (the largest part is as small as possible). Same listing, seed and N: same parts, on any
host. Part I is written as a split of its own, by the same writer, into
``<out>/<split>.parts/part-I-of-N/<split>/``, and its record ``part.json`` is written beside it
last (a part without a record is not finished).

``pipeline make-shards ... --tasks N --merge`` checks every record (present, same settings, same
listing, its shards the recorded sizes) and refuses with one line per part that is missing,
damaged or made otherwise; else it writes the split exactly as one task would. It has to
rewrite the images rather than adopt the parts' tars: every sample's key and ``json`` carry its
catalog row (its row in ``index.parquet``, which the eval loader reports), and a part cannot
know its first row before the earlier parts have counted their unreadable images. So the merge
streams the parts' images (no decode) through the writer in the split's class order, which also
gives the single-task shards, names and catalog byte for byte; the images are read back and
decoded once more by the writer's validation, and the catalog is published last. The parts'
checksums are verified while they are read. After the split is published the part folders are
removed (only the files make-shards wrote).

The plan of the parts, their records and the merge's check of them are
``pipeline.data.part_records``; this module writes a part, merges, and runs the command.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sys
import tarfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.data.catalog import read_index, read_sizes
from pipeline.data.items import SourceItem
from pipeline.data.outdir import ShardWriteError, discard_partial, foreign_entries
from pipeline.data.part_records import (
    RECORD_FILE,
    RECORD_VERSION,
    PartsError,
    check_parts,
    class_runs,
    describe_part,
    file_sha256,
    listing_digest,
    part_dir,
    parts_dir,
    plan_parts,
    settings_of,
)
from pipeline.data.writer import write_split
from pipeline.errors import UserError


class TaskFlagError(UserError, ValueError):
    """``--tasks``/``--task``/``--merge`` used out of their rules."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The array flags of ``pipeline make-shards``."""
    group = parser.add_argument_group("array (one part of the classes per task, then a merge)")
    group.add_argument(
        "--tasks",
        type=int,
        default=0,
        metavar="N",
        help="split each split's classes into N parts; alone: print the parts and write nothing",
    )
    group.add_argument("--task", type=int, metavar="I", help="convert part I (0..N-1)")
    group.add_argument(
        "--merge", action="store_true", help="check the N parts and write the split from them"
    )


def check_flags(args: argparse.Namespace) -> None:
    """Refuse inconsistent array flags before any work (TaskFlagError, one line)."""
    task, tasks = args.task, args.tasks
    if tasks < 0 or (tasks == 0 and (task is not None or args.merge)):
        raise TaskFlagError(
            f"--tasks {tasks}: give the number of parts (>= 1) with --task I or --merge, "
            "e.g. --tasks 8 --task 0"
        )
    if task is not None and args.merge:
        raise TaskFlagError("--task and --merge: a command either converts one part or merges")
    if tasks and "://" in str(args.out):
        raise TaskFlagError(
            f"--tasks with --out {args.out}: array parts and their merge are written to a local "
            "or cluster file system; convert there, then copy the split to the object store"
        )
    if task is not None and not 0 <= task < tasks:
        raise TaskFlagError(f"--task {task}: parts are numbered 0..{tasks - 1} (--tasks {tasks})")


# ---------------------------------------------------------------------------- one part


def write_part(
    items: list[SourceItem],
    out: str | Path,
    *,
    name: str,
    split: str,
    task: int,
    tasks: int,
    seed: int,
    settings: dict[str, Any],
    inputs: Iterable[str | Path] = (),
    **options: Any,
) -> dict[str, Any]:
    """Write part ``task`` of ``tasks`` of the split listed by ``items`` and return its record.

    ``options``: ``write_split``'s (samples_per_shard, resize, quality, workers, ...). The part
    folder belongs to the array: an earlier attempt there (complete or killed) is replaced.
    """
    runs = class_runs(items, seed)
    span = plan_parts([len(r) for r in runs], tasks)[task]
    mine = runs[span.start : span.stop]
    folder = part_dir(out, split, task, tasks)
    record_path = folder / RECORD_FILE
    # The record goes first: from here until the new one is written the part is unfinished.
    record_path.unlink(missing_ok=True)
    if folder.is_dir():  # what a killed attempt left (a kill -9 runs no clean-up)
        for stale in folder.glob(f"{split}.partial-*"):
            with contextlib.suppress(OSError):
                discard_partial(stale)
    part_items = [item for run in mine for item in run]
    summary = write_split(
        part_items,
        folder,
        name=name,
        split=split,
        seed=seed,
        in_order=True,
        overwrite=True,
        inputs=inputs,
        **options,
    )
    split_dir = Path(summary.directory)
    skipped = _skipped_positions(part_items, (split_dir / "skipped.txt").read_text())
    record = {
        "version": RECORD_VERSION,
        "split": split,
        "task": task,
        "tasks": tasks,
        "settings": settings,
        "listing": listing_digest(items),
        "classes": [[run[0].class_name, len(run)] for run in mine],
        "listed": summary.listed,
        "written": summary.samples,
        "skipped": skipped,
        "shards": {
            shard: {"samples": n, "bytes": (split_dir / shard).stat().st_size}
            | {"sha256": file_sha256(split_dir / shard)}
            for shard, n in read_sizes(split_dir).items()
        },
        "host": socket.gethostname(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, record_path)  # the part is finished when its record appears, whole
    return record


def _skipped_positions(items: list[SourceItem], skipped_txt: str) -> list[list]:
    """[position in the part, source, reason] of each line of the part's skipped.txt (the
    writer lists skipped items in write order, by path), so that a merge run with the dataset
    mounted elsewhere still knows which of its items they are."""
    found, position = [], 0
    for line in skipped_txt.splitlines():
        path, _, reason = line.partition("\t")
        while position < len(items) and (items[position].path or items[position].source) != path:
            position += 1
        if position == len(items):  # the writer lists only what it was given
            raise RuntimeError(f"skipped.txt names {path!r}, which is not an item of the part")
        found.append([position, items[position].source, reason])
        position += 1
    return found


def _tar_samples(path: Path, sha256: str, what: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a part's shard, in tar order; the file's
    SHA-256, computed while it is read, must be ``sha256`` (PartsError naming ``what``)."""
    h = hashlib.sha256()

    class Hashing:  # tarfile's stream mode reads through this, so the file is read once
        def __init__(self, f) -> None:
            self.f = f

        def read(self, n: int = -1) -> bytes:
            block = self.f.read(n)
            h.update(block)
            return block

    key, members = None, {}
    with open(path, "rb") as f:
        reader = Hashing(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for info in tar:
                    base, _, ext = info.name.partition(".")
                    if base != key and key is not None:
                        yield key, members
                        members = {}
                    key = base
                    members[ext] = tar.extractfile(info).read()
        except tarfile.TarError as e:
            raise PartsError(f"{what}: {path} is not a readable tar ({e}); re-run the part") from e
        if key is not None:
            yield key, members
        while reader.read(1 << 20):  # the end-of-archive blocks, for the checksum
            pass
    if h.hexdigest() != sha256:
        raise PartsError(
            f"{what}: {path} changed since the part was written (SHA-256 differs from its "
            "record); re-run the part, then merge again"
        )


def _part_results(
    items: list[SourceItem], folder: Path, split: str, record: dict[str, Any], what: str
) -> Iterator[tuple[str, Any]]:
    """The writer's (status, payload) of each item of one part, from the part's files."""
    split_dir = folder / split
    rows = read_index(split_dir).select(["key", "source", "width", "height"]).to_pylist()
    skipped = deque(record["skipped"])
    samples = (
        sample
        for shard, info in record["shards"].items()
        for sample in _tar_samples(split_dir / shard, info["sha256"], what)
    )
    written = 0
    for position, item in enumerate(items):
        if skipped and skipped[0][0] == position:
            yield "bad", skipped.popleft()[2]
            continue
        key, members = next(samples, (None, {}))
        row = rows[written] if written < len(rows) else None
        written += 1
        if row is None or key != row["key"] or row["source"] != item.source or "jpg" not in members:
            raise PartsError(
                f"{what}: sample {written - 1} is {key!r} ({row and row['source']!r}), expected "
                f"{item.source!r} with a jpg: the part does not match its record; re-run it"
            )
        yield "ok", (members["jpg"], row["width"], row["height"])
    if skipped or next(samples, None) is not None or written != len(rows):
        raise PartsError(f"{what}: holds more samples than its record lists; re-run it")


def merge_parts(
    items: list[SourceItem],
    out: str | Path,
    *,
    name: str,
    split: str,
    tasks: int,
    seed: int,
    settings: dict[str, Any],
    **options: Any,
):
    """Check the parts, write the split ``<out>/<split>`` from them (``write_split``'s
    ``options``: extra_files, overwrite, inputs, workers, ...), then remove the parts.
    Returns the split's WriteSummary; raises PartsError before writing anything when a part is
    missing, damaged or made otherwise."""
    records = check_parts(items, out, split=split, tasks=tasks, seed=seed, settings=settings)
    folders = [part_dir(out, split, task, tasks) for task in range(tasks)]

    def prepared(ordered: list[SourceItem]) -> Iterator[tuple[str, Any]]:
        start = 0
        for task, (folder, record) in enumerate(zip(folders, records)):
            end = start + record["listed"]
            yield from _part_results(ordered[start:end], folder, split, record, f"part {task}")
            start = end

    summary = write_split(
        items, out, name=name, split=split, seed=seed, prepared=prepared, **options
    )
    for folder in folders:
        remove_part(folder, split)
    with contextlib.suppress(OSError):
        parts_dir(out, split).rmdir()
    return summary


def remove_part(folder: Path, split: str) -> None:
    """Remove a merged part's files (only those make-shards wrote), then its empty folders."""
    split_dir = folder / split
    if split_dir.is_dir():
        foreign = set(foreign_entries(split_dir, split))
        for entry in os.listdir(split_dir):
            if entry not in foreign:
                os.unlink(split_dir / entry)
    with contextlib.suppress(OSError):
        split_dir.rmdir()
    (folder / RECORD_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


# ---------------------------------------------------------------------------- the command


def write_options(args: argparse.Namespace, crop: dict[str, Any] | None) -> dict[str, Any]:
    """``write_split``'s options from make-shards' arguments and its checked face crop (the
    same as one task's)."""
    return {
        "crop": crop,
        "samples_per_shard": args.samples_per_shard,
        "resize": args.resize or 0,
        "quality": args.quality,
        "workers": args.workers,
        "max_skipped_fraction": args.max_skipped_fraction,
        "progress": not args.no_progress,
    }


def run(
    args: argparse.Namespace,
    name: str,
    listed: dict[str, tuple[list[SourceItem], dict]],
    inputs: list[Path],
    crop: dict[str, Any] | None = None,
) -> int:
    """make-shards with ``--tasks``: print the plan (alone), convert one part (``--task``) or
    merge (``--merge``), for every split; the arguments and listings are already checked.
    Refusals before any work raise (exit 2); failures while writing print one line, exit 1."""
    settings = settings_of(args)
    plans = {}
    for split, (items, _) in listed.items():
        runs = class_runs(items, args.seed)
        try:
            plans[split] = (runs, plan_parts([len(r) for r in runs], args.tasks))
        except PartsError as e:
            raise PartsError(f"split {split!r}: {e}") from None
    if args.merge:
        # Every split's parts are checked before the first split is written.
        for split, (items, _) in listed.items():
            check_parts(
                items, args.out, split=split, tasks=args.tasks, seed=args.seed, settings=settings
            )
    elif args.task is None:
        for split, (runs, plan) in plans.items():
            print(f"split {split!r}: {len(runs)} classes in {args.tasks} parts")
            for task, span in enumerate(plan):
                print(f"  part {task}: {describe_part(runs, span)}")
        print("convert: the same command with --task I (I = 0..N-1), then with --merge")
        return 0
    for split, (items, extra) in listed.items():
        start = time.time()
        common = dict(name=name, split=split, tasks=args.tasks, seed=args.seed, settings=settings)
        try:
            if args.merge:
                summary = merge_parts(
                    items,
                    args.out,
                    extra_files=extra,
                    overwrite=args.overwrite,
                    inputs=inputs,
                    **common,
                    **write_options(args, crop),
                )
                line = f"{summary.line()}, merged from {args.tasks} parts"
            else:
                record = write_part(
                    items,
                    args.out,
                    task=args.task,
                    inputs=inputs,
                    **common,
                    **write_options(args, crop),
                )
                line = (
                    f"{part_dir(args.out, split, args.task, args.tasks)}: part {args.task} of "
                    f"{args.tasks}, {record['written']} samples, {len(record['classes'])} "
                    f"classes, {len(record['shards'])} shards, skipped {len(record['skipped'])} "
                    f"of {record['listed']} listed images"
                )
        except (ShardWriteError, ValueError) as e:
            print(f"make-shards: error: {e}", file=sys.stderr)
            return 1
        print(f"{line} in {time.time() - start:.1f} s")
    return 0
