"""Checks that the shard index can answer in seconds, before DeepSpeed starts: an error that the
config and the shard index can reveal should cost seconds, not a queued job's engine start-up.

``preflight(cfg, world_size)`` reads ``index.parquet``, ``sizes.json``, the shards' file sizes
(``os.stat``) and their tar headers, never their images. It refuses, with a one-line
:class:`PreflightError` naming the key, file or value, the rule and the fix:

* train or eval shards that do not exist (today a bad ``data.eval_urls`` is found after all
  the training);
* a dataset with fewer shards than ranks (ranks read disjoint shards);
* a P x K batch that a stream cannot fill: for every epoch of the run, every rank and every
  stream, the classes in that stream's shards (pipeline.data.stream deals the shards exactly
  this way) that give a group of K images must number at least P;
* a truncated shard: smaller than the tar headers and image bytes that ``index.parquet`` lists
  for it need, or a sample count that disagrees with ``sizes.json``;
* a damaged tar member header or a ``cls`` member that is not an integer (the headers are
  walked, one small read per member: ``pipeline.data.tarheaders``);
* the eval split, read for the evaluation protocol's own checks (a query with a positive for
  retrieval, the ids and lists for IJB-C): ``pipeline.eval.protocols.preflight`` runs these
  checks, then the protocol's, and is what entry points call;
* a missing ``model.pretrained_path``;
* a world size with which a given global batch (e.g. the resumed checkpoint's) cannot be kept.

Splits in an object store (``s3://bucket/prefix/split``) are checked the same way: their
catalog and sizes are read from the store, and their shards' sizes come from one listing (a
missing bucket or refused credentials are a one-line error here, before any engine starts).
Other remote shards (``pipe:``, http) cannot be listed or sized: only their count is checked.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config.runconfig import RunConfig
from pipeline.config.schema import ConfigError
from pipeline.data import storage, storage_ops
from pipeline.data.catalog import (
    INDEX_FILE,
    SHARD_BYTES,
    SIZES_FILE,
    _is_remote,
    expand_urls,
    read_index,
    read_sizes,
)
from pipeline.data.dealing import rank_shards, stream_shards, streams_per_rank
from pipeline.data.tarheaders import scan_shard

TAR_BLOCK = 512
"""A tar member is a 512-byte header plus its data padded to 512 bytes."""


class PreflightError(ConfigError):
    """The data (or world size) cannot run this config; the message names what and the fix."""


@dataclass
class EvalSplit:
    """What preflight read of the eval split's catalog (never a shard's contents): what an
    evaluation protocol checks (pipeline.eval.protocols)."""

    spec: str
    """``data.eval_urls`` as configured."""
    urls: list[str]
    indexed: bool
    """Every shard has an ``index.parquet`` beside it (local shards)."""
    columns: set[str] = field(default_factory=set)
    label_counts: dict[int, int] = field(default_factory=dict)
    """Samples per label over the whole split (local, indexed shards only)."""


@dataclass
class PreflightReport:
    """What was checked: shards and samples per dataset, and how long it took."""

    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)
    eval_split: EvalSplit | None = None
    """The eval split as read (with ``evaluate``), for the protocol's own checks."""


def _tar_lower_bound(image_bytes):  # int or numpy array
    """Fewest bytes a make-shards sample occupies in its tar: the jpg member (header + data
    padded to blocks) and the cls and json members (never empty: a header + one block each)."""
    return TAR_BLOCK + -(-image_bytes // TAR_BLOCK) * TAR_BLOCK + 2 * 2 * TAR_BLOCK


@dataclass
class _Split:
    """The index of the local shards of one spec: per shard, its samples' labels and bytes."""

    urls: list[str]
    remote: bool
    samples: dict[str, int] = field(default_factory=dict)  # url -> rows in index.parquet
    class_counts: dict[str, dict[int, int]] = field(default_factory=dict)  # url -> label -> n
    indexed: bool = False
    columns: set[str] = field(default_factory=set)


def _read_split(key: str, spec: str, validate_hint: str) -> _Split:
    """Expand ``spec`` and read the index of its local shards; truncation and count checks."""
    try:
        urls = expand_urls(spec)
        split = _Split(urls, remote=any(_is_remote(u) and not storage.is_s3(u) for u in urls))
        if not split.remote:
            _read_indexes(split, key, spec, validate_hint)
    except PreflightError:
        raise
    except (ValueError, storage.StorageError) as e:
        raise PreflightError(f"{key}={spec!r}: {e}") from None
    return split


def _read_indexes(split: _Split, key: str, spec: str, validate_hint: str) -> None:

    by_dir: dict[str, list[str]] = defaultdict(list)
    for u in split.urls:
        by_dir[storage.parent(u)].append(u)
    has_index = {d: storage_ops.exists(storage.join(d, INDEX_FILE)) for d in by_dir}
    split.indexed = all(has_index.values())
    for directory, dir_urls in by_dir.items():
        if not has_index[directory]:
            continue
        table = read_index(storage.join(directory, INDEX_FILE))
        split.columns |= set(table.column_names)
        missing_cols = {"shard", "label", "bytes"} - set(table.column_names)
        if missing_cols:
            raise PreflightError(
                f"{key}={spec!r}: {directory / INDEX_FILE} has no {sorted(missing_cols)} "
                f"column(s); rewrite the split with `pipeline make-shards`"
            )
        # Vectorised: VGGFace2's 3.3M rows take about a second.
        shard_codes = table.column("shard").combine_chunks().dictionary_encode()
        names = shard_codes.dictionary.to_pylist()
        code = shard_codes.indices.to_numpy()
        rows = np.bincount(code, minlength=len(names))
        need = np.bincount(
            code,
            weights=_tar_lower_bound(table.column("bytes").to_numpy().astype(np.int64)),
            minlength=len(names),
        )
        pairs = (
            table.select(["shard", "label"])
            .group_by(["shard", "label"])
            .aggregate([("label", "count")])
        )
        counts: dict[str, dict[int, int]] = defaultdict(dict)
        for shard, label, n in zip(
            pairs.column("shard").to_pylist(),
            pairs.column("label").to_pylist(),
            pairs.column("label_count").to_pylist(),
        ):
            counts[shard][label] = n
        where = {name: i for i, name in enumerate(names)}
        sizes = (
            read_sizes(directory) if storage_ops.exists(storage.join(directory, SIZES_FILE)) else {}
        )
        listed = storage_ops.list_objects(directory) if storage.is_s3(directory) else None
        recorded = _recorded_sizes(table)
        for u in dir_urls:
            name = storage.basename(u)
            i = where.get(name)
            count = int(rows[i]) if i is not None else 0
            if sizes and sizes.get(name) != count:
                raise PreflightError(
                    f"{key}={spec!r}: shard {u} has {sizes.get(name)} samples in {SIZES_FILE} "
                    f"but {count} rows in {INDEX_FILE}: the split's files come from different "
                    f"writes; {validate_hint}"
                )
            least = int(need[i]) if i is not None else 0
            actual = os.path.getsize(u) if listed is None else listed.get(name, -1)
            _check_shard_file(
                f"{key}={spec!r}", u, count, least, actual, recorded.get(name), validate_hint
            )
            split.samples[u] = count
            split.class_counts[u] = counts.get(name, {})


def _check_shard_file(
    where: str,
    u: str,
    count: int,
    least: int,
    actual: int,
    recorded: int | None,
    validate_hint: str,
) -> None:
    """One shard's file against its catalog: present (``actual`` >= 0 bytes), large enough for
    the ``count`` samples it lists (``least`` bytes), the size the catalog ``recorded`` (newer
    splits), and, on a local disk, tar headers and ``cls`` values that read."""
    if actual < 0:
        raise PreflightError(
            f"{where}: shard {u} is in {SIZES_FILE} but not in the store; "
            f"{validate_hint}, then upload the split again"
        )
    if actual < least:
        raise PreflightError(
            f"{where}: shard {u} is {actual} bytes, but its {count} samples in "
            f"{INDEX_FILE} need at least {least}: the shard is truncated (an "
            f"interrupted write or copy); {validate_hint}, then re-copy or rewrite it"
        )
    if recorded is not None and actual != recorded:
        raise PreflightError(
            f"{where}: shard {u} is {actual} bytes, but {INDEX_FILE} records "
            f"{recorded}: it changed or was cut short after it was written; "
            f"{validate_hint}, then re-copy or rewrite it"
        )
    # The tar headers (and cls values) too: cheap on a local disk (not read from an object
    # store), and a damaged one would otherwise end the run as a DataLoader worker's traceback.
    problem = None if storage.is_s3(u) else scan_shard(u)
    if problem:
        raise PreflightError(
            f"{where}: shard {u}: {problem}; {validate_hint}, then re-copy or "
            "rewrite the shard with `pipeline make-shards`"
        )


def _recorded_sizes(table) -> dict[str, int]:
    """Shard name -> size in bytes as the catalog records it (empty for older splits)."""
    if SHARD_BYTES not in table.column_names:
        return {}
    pairs = table.select(["shard", SHARD_BYTES]).group_by(["shard", SHARD_BYTES]).aggregate([])
    return dict(zip(pairs.column("shard").to_pylist(), pairs.column(SHARD_BYTES).to_pylist()))


def _hint(spec: str) -> str:
    target = spec if os.path.isdir(spec) or storage.is_s3(spec) else "SPLIT_DIR"
    return f"run `pipeline validate-shards {target}`"


def _check_train(cfg: RunConfig, world_size: int, report: PreflightReport) -> None:
    sampler = cfg.sampler
    p, k = sampler.classes_per_batch, sampler.samples_per_class
    try:  # the stream's own rule (pipeline.data.dealing)
        num_streams = streams_per_rank(cfg.data, sampler)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    for d, source in enumerate(cfg.data.train):
        key = f"data.train[{d}].urls"
        what = f"data.train[{d}] ({source.name})"
        split = _read_split(key, source.urls, _hint(source.urls))
        urls = split.urls
        if len(urls) < world_size:
            raise PreflightError(
                f"{what}: {len(urls)} shard(s) ({source.urls}) for {world_size} ranks; every "
                "rank reads its own shards (disjoint within an epoch): use at most "
                f"{len(urls)} ranks or rewrite the dataset with a smaller --samples-per-shard"
            )
        if not split.indexed:
            report.lines.append(
                f"{what}: {len(urls)} shards; no {INDEX_FILE} beside them, P x K not checked"
            )
            continue
        # A class gives a group of K when it has a run of >= K images in one shard ('skip'),
        # or any image ('replace' pads by sampling with replacement); shards are class-contiguous.
        skip = sampler.small_class_policy == "skip"
        usable = {
            u: frozenset(c for c, n in counts.items() if not skip or n >= k)
            for u, counts in split.class_counts.items()
        }
        total = len(frozenset().union(*usable.values()))
        rule = (
            f"with >= K={k} images in one shard (sampler.small_class_policy='skip')"
            if skip
            else "(sampler.small_class_policy='replace')"
        )
        seen: set[tuple[str, ...]] = set()  # streams already checked (same shards, any epoch)
        for epoch in range(cfg.train.epochs):
            for rank in range(world_size):
                mine = rank_shards(
                    urls,
                    seed=sampler.seed,
                    epoch=epoch,
                    dataset=d,
                    rank=rank,
                    world_size=world_size,
                )
                for stream in range(num_streams):
                    shards = stream_shards(mine, stream, num_streams)
                    as_set = tuple(sorted(shards))
                    if as_set in seen:
                        continue
                    seen.add(as_set)
                    classes = frozenset().union(*(usable[u] for u in shards))
                    if len(classes) < p:
                        raise PreflightError(
                            f"{what}: in epoch {epoch}, rank {rank} of {world_size}, stream "
                            f"{stream} of {num_streams} reads {len(shards)} shard(s) holding "
                            f"{len(classes)} classes {rule}, but a batch needs P={p} distinct "
                            f"classes (sampler.classes_per_batch); the dataset has {total} such "
                            f"classes in {len(urls)} shards for {world_size} ranks x "
                            f"{num_streams} streams: lower sampler.classes_per_batch to "
                            f"{max(1, len(classes))}, use fewer ranks or "
                            "sampler.streams_per_rank"
                            + (", or set sampler.small_class_policy='replace'" if skip else "")
                        )
        samples = sum(split.samples.values())
        report.lines.append(
            f"{what}: {len(urls)} shards, {samples} samples, {total} classes usable for K={k}; "
            f"P={p} fillable on {world_size} ranks x {num_streams} streams for "
            f"{cfg.train.epochs} epoch(s)"
        )


def _check_eval(cfg: RunConfig, report: PreflightReport) -> None:
    spec = cfg.data.eval_urls
    split = _read_split("data.eval_urls", spec, _hint(spec))
    counts: dict[int, int] = defaultdict(int)
    for per_class in split.class_counts.values():
        for label, n in per_class.items():
            counts[label] += n
    report.eval_split = EvalSplit(spec, split.urls, split.indexed, split.columns, dict(counts))
    report.lines.append(f"data.eval_urls: {len(split.urls)} shards ({cfg.eval.protocol})")


def check_global_batch(cfg: RunConfig, world_size: int, global_batch: int) -> None:
    """Refuse a world size with which ``global_batch`` images per step cannot be kept:
    it must be sampler.samples_per_class x world_size x sampler.classes_per_batch."""
    p, k = cfg.sampler.classes_per_batch, cfg.sampler.samples_per_class
    if global_batch % (k * world_size):
        fits = [w for w in range(1, global_batch // k + 1) if (global_batch // k) % w == 0]
        raise PreflightError(
            f"world size {world_size} cannot keep the global batch of {global_batch} images: "
            f"it must be sampler.samples_per_class ({k}) x ranks x sampler.classes_per_batch, "
            f"and {global_batch} is not a multiple of {k} x {world_size}; run on one of "
            f"{fits[:12]} ranks"
        )
    want = global_batch // (k * world_size)
    if want != p:
        raise PreflightError(
            f"sampler.classes_per_batch={p} on {world_size} ranks gives a global batch of "
            f"{p * k * world_size} images, not {global_batch}: set "
            f"sampler.classes_per_batch={want} to keep it"
        )


def preflight(
    cfg: RunConfig,
    world_size: int,
    *,
    train: bool = True,
    evaluate: bool = True,
    global_batch: int | None = None,
) -> PreflightReport:
    """Check what the shard index can reveal about running ``cfg`` on ``world_size`` ranks
    (see the module doc); raise PreflightError on the first problem.

    ``train``: the training shards and P x K; ``evaluate``: the eval shards and protocol;
    ``global_batch``: images per step that must be kept (a resumed checkpoint's).
    """
    start = time.perf_counter()
    storage.configure(cfg.data.storage)
    if world_size < 1:
        raise PreflightError(f"world size {world_size}: must be >= 1")
    report = PreflightReport()
    if cfg.model.pretrained_path and not Path(cfg.model.pretrained_path).is_file():
        raise PreflightError(
            f"model.pretrained_path={cfg.model.pretrained_path!r}: the file does not exist; "
            "copy the backbone weights there or set model.pretrained_path=''"
        )
    if global_batch is not None:
        check_global_batch(cfg, world_size, global_batch)
    if train:
        _check_train(cfg, world_size, report)
    if evaluate:
        _check_eval(cfg, report)
    report.seconds = time.perf_counter() - start
    return report
