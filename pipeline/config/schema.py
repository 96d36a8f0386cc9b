"""Typed run configuration: defaults -> YAML file -> dotted ``key=value`` overrides.

Each component owns one dataclass and receives only its own section
(``cfg.loss``, ``cfg.data``, ...), never the whole run config. Unknown keys and
wrong types are errors that name the key and list the valid ones.

This module holds ``ConfigError``, the field check every section uses, and the data sections
(``data``, ``data.storage``, ``sampler``). The other sections: ``pipeline.config.schema_train``
(``model``, ``loss``, ``optim``, ``train``) and ``pipeline.config.schema_services`` (``eval``,
``tracking``, ``launch``); the whole run, ``RunConfig``: ``pipeline.config.runconfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override broke a rule; the message names the key and the fix."""


def check(ok: bool, name: str, value: Any, rule: str) -> None:
    """Raise ConfigError naming the key ``name``, its ``value`` and the ``rule`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name}={value!r}: {rule}")


@dataclass
class DatasetSource:
    """One training dataset in a (possibly mixed) stream."""

    name: str = "synthetic"
    """Shown in messages; labels are namespaced by the dataset's position in data.train
    (class c of dataset d becomes d * 2**32 + c, see pipeline.data.stream.namespaced_label)."""
    urls: str = "data/synthetic/train"
    """Shards: a split directory (as written by make-shards), brace patterns joined by '::',
    a .txt list file, or any URL webdataset opens (``pipe:...``)."""
    weight: float = 1.0
    """Share of the batches drawn from this dataset when several are mixed."""

    def __post_init__(self) -> None:
        check(self.weight > 0, "data.train[].weight", self.weight, "must be > 0")
        check(bool(self.urls), "data.train[].urls", self.urls, "must name shards")


@dataclass
class StorageConfig:
    """How splits in an S3-compatible object store (``s3://bucket/prefix/split``) are reached.
    Credentials are never set here: they come from the standard AWS sources (AWS_ACCESS_KEY_ID
    and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials)."""

    endpoint_url: str = ""
    """The store's endpoint (MinIO, Ceph, SeaweedFS: http://host:port); '': AWS_ENDPOINT_URL,
    else AWS itself."""
    region: str = ""
    """The store's region; '': AWS_REGION or AWS_DEFAULT_REGION, else the profile's."""
    read_attempts: int = 8
    """Attempts of one read before the shard is an error (a transient failure is retried,
    with waits doubling from retry_wait_s up to retry_max_wait_s, and counted)."""
    retry_wait_s: float = 0.25
    """Wait before the first retry of a failed read, in seconds."""
    retry_max_wait_s: float = 8.0
    """Longest wait between two attempts, in seconds."""

    def __post_init__(self) -> None:
        check(
            self.endpoint_url == "" or "://" in self.endpoint_url,
            "data.storage.endpoint_url",
            self.endpoint_url,
            "must be a URL such as http://127.0.0.1:9000, or '' for AWS_ENDPOINT_URL",
        )
        check(
            self.read_attempts >= 1,
            "data.storage.read_attempts",
            self.read_attempts,
            "must be >= 1",
        )
        check(
            self.retry_wait_s >= 0, "data.storage.retry_wait_s", self.retry_wait_s, "must be >= 0"
        )
        check(
            self.retry_max_wait_s >= self.retry_wait_s,
            "data.storage.retry_max_wait_s",
            self.retry_max_wait_s,
            f"must be >= data.storage.retry_wait_s ({self.retry_wait_s})",
        )


@dataclass
class DataConfig:
    """Where shards come from and how images become tensors."""

    train: list[DatasetSource] = field(default_factory=lambda: [DatasetSource()])
    """Training datasets, mixed batch by batch by their weights."""
    eval_urls: str = "data/synthetic/test"
    """Held-out shards for retrieval evaluation (classes disjoint from training); same forms
    as data.train[].urls."""
    image_size: int = 224
    """Side of the square crop fed to the network, in pixels."""
    resize_size: int = 256
    """Eval: shorter side is resized to this before the center crop of image_size."""
    crop_scale_min: float = 0.16
    """Train: smallest area fraction of RandomResizedCrop."""
    num_workers: int = 2
    """Data workers per rank: decoding threads (``loader=threads``) or DataLoader worker
    processes (``loader=processes``, and always for evaluation)."""
    loader: str = "threads"
    """How training batches are made: threads (num_workers threads of the training process
    decode and transform into the batch in place: no batch copied between processes) or
    processes (a DataLoader with num_workers worker processes). The same batches either way."""
    crop: str = "auto"
    """The face crop the shards hold: auto (read from the splits' catalogs, and from the
    weights when evaluating), none, loose or aligned (pipeline.data.faces)."""
    crop_size: int = 0
    """With crop=loose/aligned: the stored crop's shorter side / side (0: the splits' own)."""
    allow_crop_mismatch: bool = False
    """Evaluate on shards of another crop mode than the model's (refused by default)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-store access for s3:// shards (endpoint, region, read retries)."""

    def __post_init__(self) -> None:
        check(self.image_size > 0, "data.image_size", self.image_size, "must be > 0")
        check(
            self.crop in ("auto", "none", "loose", "aligned"),
            "data.crop",
            self.crop,
            "must be one of auto, none, loose, aligned",
        )
        check(self.crop_size >= 0, "data.crop_size", self.crop_size, "must be >= 0")
        check(
            self.resize_size >= self.image_size,
            "data.resize_size",
            self.resize_size,
            f"must be >= data.image_size ({self.image_size})",
        )
        check(
            0 < self.crop_scale_min <= 1,
            "data.crop_scale_min",
            self.crop_scale_min,
            "must be in (0, 1]",
        )
        check(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        check(
            self.loader in ("threads", "processes"),
            "data.loader",
            self.loader,
            "must be threads or processes",
        )
        check(len(self.train) > 0, "data.train", self.train, "needs at least one dataset")


@dataclass
class SamplerConfig:
    """Class-balanced P x K batches (the paper's sampler)."""

    classes_per_batch: int = 16
    """P: distinct classes in each local (per-rank) batch."""
    samples_per_class: int = 4
    """K: images of each class in a batch."""
    steps_per_epoch: int = 100
    """Batches per epoch on every rank (equal on all ranks, or training hangs)."""
    shuffle_buffer_groups: int = 256
    """Class groups held in the shuffle buffer that batches are drawn from."""
    small_class_policy: str = "replace"
    """A class with fewer than K images: 'replace' samples with replacement, 'skip' drops it (counted)."""
    seed: int = 0
    """Seed of the stream (shard order, shuffle buffer, augmentation); combined with epoch, rank,
    stream and batch."""
    streams_per_rank: int = 0
    """Independent P x K streams per rank, each reading its own shards; batch b comes from
    stream b mod this. Must be a multiple of data.num_workers; 0: max(1, data.num_workers).
    Batches depend on it (and on seed, epoch, rank, world size), not on data.num_workers."""

    @property
    def batch_size_per_gpu(self) -> int:
        return self.classes_per_batch * self.samples_per_class

    def __post_init__(self) -> None:
        check(
            self.classes_per_batch >= 1,
            "sampler.classes_per_batch",
            self.classes_per_batch,
            "must be >= 1",
        )
        check(
            self.samples_per_class >= 2,
            "sampler.samples_per_class",
            self.samples_per_class,
            "must be >= 2 (a query needs a positive)",
        )
        check(
            self.steps_per_epoch >= 1,
            "sampler.steps_per_epoch",
            self.steps_per_epoch,
            "must be >= 1",
        )
        check(
            self.shuffle_buffer_groups >= self.classes_per_batch,
            "sampler.shuffle_buffer_groups",
            self.shuffle_buffer_groups,
            f"must be >= sampler.classes_per_batch ({self.classes_per_batch})",
        )
        check(
            self.small_class_policy in ("replace", "skip"),
            "sampler.small_class_policy",
            self.small_class_policy,
            "must be 'replace' or 'skip'",
        )
        check(
            self.streams_per_rank >= 0,
            "sampler.streams_per_rank",
            self.streams_per_rank,
            "must be >= 0 (0: one stream per data worker)",
        )
