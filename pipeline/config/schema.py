"""Typed run configuration: defaults -> YAML file -> dotted ``key=value`` overrides.

Each component owns one dataclass and receives only its own section
(``cfg.loss``, ``cfg.data``, ...), never the whole run config. Unknown keys and
wrong types are errors that name the key and list the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override broke a rule; the message names the key and the fix."""


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
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
        _check(self.weight > 0, "data.train[].weight", self.weight, "must be > 0")
        _check(bool(self.urls), "data.train[].urls", self.urls, "must name shards")


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
        _check(
            self.endpoint_url == "" or "://" in self.endpoint_url,
            "data.storage.endpoint_url",
            self.endpoint_url,
            "must be a URL such as http://127.0.0.1:9000, or '' for AWS_ENDPOINT_URL",
        )
        _check(
            self.read_attempts >= 1,
            "data.storage.read_attempts",
            self.read_attempts,
            "must be >= 1",
        )
        _check(
            self.retry_wait_s >= 0, "data.storage.retry_wait_s", self.retry_wait_s, "must be >= 0"
        )
        _check(
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
        _check(self.image_size > 0, "data.image_size", self.image_size, "must be > 0")
        _check(
            self.crop in ("auto", "none", "loose", "aligned"),
            "data.crop",
            self.crop,
            "must be one of auto, none, loose, aligned",
        )
        _check(self.crop_size >= 0, "data.crop_size", self.crop_size, "must be >= 0")
        _check(
            self.resize_size >= self.image_size,
            "data.resize_size",
            self.resize_size,
            f"must be >= data.image_size ({self.image_size})",
        )
        _check(
            0 < self.crop_scale_min <= 1,
            "data.crop_scale_min",
            self.crop_scale_min,
            "must be in (0, 1]",
        )
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        _check(
            self.loader in ("threads", "processes"),
            "data.loader",
            self.loader,
            "must be threads or processes",
        )
        _check(len(self.train) > 0, "data.train", self.train, "needs at least one dataset")


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
        _check(
            self.classes_per_batch >= 1,
            "sampler.classes_per_batch",
            self.classes_per_batch,
            "must be >= 1",
        )
        _check(
            self.samples_per_class >= 2,
            "sampler.samples_per_class",
            self.samples_per_class,
            "must be >= 2 (a query needs a positive)",
        )
        _check(
            self.steps_per_epoch >= 1,
            "sampler.steps_per_epoch",
            self.steps_per_epoch,
            "must be >= 1",
        )
        _check(
            self.shuffle_buffer_groups >= self.classes_per_batch,
            "sampler.shuffle_buffer_groups",
            self.shuffle_buffer_groups,
            f"must be >= sampler.classes_per_batch ({self.classes_per_batch})",
        )
        _check(
            self.small_class_policy in ("replace", "skip"),
            "sampler.small_class_policy",
            self.small_class_policy,
            "must be 'replace' or 'skip'",
        )
        _check(
            self.streams_per_rank >= 0,
            "sampler.streams_per_rank",
            self.streams_per_rank,
            "must be >= 0 (0: one stream per data worker)",
        )


@dataclass
class ModelConfig:
    """Backbone + linear embedding head, L2-normalised output."""

    backbone: str = "resnet50"
    """Any timm model name."""
    embedding_dim: int = 512
    """Output dimension of the linear head."""
    pretrained: bool = False
    """Load timm's pretrained weights (needs network access or a warm timm cache)."""
    pretrained_path: str = ""
    """Local backbone weights file (state dict), for clusters without network."""
    freeze_bn: bool = True
    """Freeze every BatchNorm layer, statistics and affine (as the paper does)."""
    sync_bn: bool = False
    """With trainable BatchNorm on several GPUs: SyncBatchNorm (batch statistics over the
    global batch; for small per-GPU batches; CUDA only). Off: each rank normalises with its
    own batch and rank 0's running statistics are broadcast after every step, as torch's DDP
    does, so every rank, checkpoint and evaluation holds one model."""
    head_lr_mult: float = 1.0
    """Learning-rate multiplier for the embedding head."""

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "model.backbone", self.backbone, "name a timm model")
        _check(self.embedding_dim > 0, "model.embedding_dim", self.embedding_dim, "must be > 0")
        _check(self.head_lr_mult > 0, "model.head_lr_mult", self.head_lr_mult, "must be > 0")


@dataclass
class LossConfig:
    """Smooth-AP (Brown et al., ECCV 2020)."""

    temperature: float = 0.01
    """tau of the sigmoid G(x) = sigmoid(x / tau)."""
    query_in_positives: bool = False
    """True reproduces the released code (the query ranks itself); False is the paper's equation."""
    query_chunk_size: int = 0
    """Queries processed at once inside the loss, to bound peak memory (0: all)."""

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "loss.temperature", self.temperature, "must be > 0")
        _check(
            self.query_chunk_size >= 0,
            "loss.query_chunk_size",
            self.query_chunk_size,
            "must be >= 0 (0 means no chunking)",
        )


@dataclass
class OptimConfig:
    """Torch optimizer and learning-rate schedule."""

    name: str = "adam"
    """'adam', 'adamw' or 'sgd'."""
    lr: float = 1e-5
    """Base learning rate of the backbone (the head gets model.head_lr_mult times it)."""
    weight_decay: float = 4e-4
    """L2 weight decay on every trainable parameter (the paper: Adam, 4e-4)."""
    momentum: float = 0.9
    """SGD only."""
    scheduler: str = "step"
    """'constant', 'step' (multiply by gamma every step_size steps) or 'cosine' (to 0 at the
    last step), after warmup_steps."""
    step_size: int = 1000
    """'step' schedule: optimizer steps between decays."""
    gamma: float = 0.3
    """'step' schedule: learning-rate factor per decay."""
    warmup_steps: int = 0
    """Linear warmup from lr / warmup_steps to lr over this many optimizer steps."""

    def __post_init__(self) -> None:
        _check(
            self.name in ("adam", "adamw", "sgd"), "optim.name", self.name, "use adam, adamw or sgd"
        )
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(
            self.scheduler in ("constant", "step", "cosine"),
            "optim.scheduler",
            self.scheduler,
            "use constant, step or cosine",
        )
        _check(self.step_size >= 1, "optim.step_size", self.step_size, "must be >= 1")
        _check(0 < self.gamma <= 1, "optim.gamma", self.gamma, "must be in (0, 1]")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")


@dataclass
class TrainConfig:
    """The DeepSpeed loop."""

    output_dir: str = "runs/default"
    """Checkpoints, resolved config and logs of this run."""
    epochs: int = 1
    """Total steps = epochs x sampler.steps_per_epoch."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1 or 2."""
    precision: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'."""
    gradient_clipping: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    gradient_accumulation_steps: int = 1
    """Must stay 1: accumulating changes Smooth-AP's objective; use train.chunk_size."""
    chunk_size: int = 0
    """Gradient cache: forward the local batch in chunks of this many images (0: off)."""
    checkpoint_every: int = 100
    """Steps between collective checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept (older ones are deleted)."""
    log_every: int = 10
    """Steps between metric logs (loss, learning rate, images/s, data wait, grad norm)."""
    seed: int = 0
    """Initial weights (same on every rank) and per-step random numbers (seed, rank, step)."""
    deterministic: bool = False
    """Deterministic algorithms (for exact resume tests on CPU)."""
    deepspeed_config: str = ""
    """Extra DeepSpeed settings (YAML/JSON file, e.g. conf/deepspeed/zero2.yaml) merged into the
    generated config; may not contradict the train.* keys it is derived from."""
    collective_timeout_s: float = 600.0
    """How long a collective (gloo/nccl) may wait for the other ranks before the job fails.
    Bounded so that a lost host ends the job (to be requeued and resumed) instead of hanging
    it for gloo's default 30 minutes; long enough for the slowest step, evaluation or
    checkpoint of a run."""
    stop_grace_s: float = 300.0
    """After SIGTERM/SIGUSR1 the run finishes its step, checkpoints and exits; if that has not
    happened after this many seconds (e.g. a collective with a lost rank), it exits at once."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        _check(
            self.collective_timeout_s > 0,
            "train.collective_timeout_s",
            self.collective_timeout_s,
            "must be > 0 seconds",
        )
        _check(self.stop_grace_s > 0, "train.stop_grace_s", self.stop_grace_s, "must be > 0")
        _check(self.zero_stage in (0, 1, 2), "train.zero_stage", self.zero_stage, "use 0, 1 or 2")
        _check(
            self.precision in ("auto", "bf16", "fp32"),
            "train.precision",
            self.precision,
            "use auto, bf16 or fp32",
        )
        _check(
            self.gradient_clipping >= 0,
            "train.gradient_clipping",
            self.gradient_clipping,
            "must be >= 0",
        )
        _check(
            self.gradient_accumulation_steps == 1,
            "train.gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "must be 1: Smooth-AP ranks every query against the whole batch, so accumulating "
            "micro-batches changes the objective; set train.chunk_size to fit a large batch "
            "in memory with the gradient cache instead",
        )
        _check(self.chunk_size >= 0, "train.chunk_size", self.chunk_size, "must be >= 0")
        _check(
            self.checkpoint_every >= 1,
            "train.checkpoint_every",
            self.checkpoint_every,
            "must be >= 1",
        )
        _check(
            self.keep_checkpoints >= 1,
            "train.keep_checkpoints",
            self.keep_checkpoints,
            "must be >= 1",
        )
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")


@dataclass
class EvalConfig:
    """Evaluation: which protocol (pipeline.eval.protocols) and its settings."""

    every: int = 0
    """Evaluate every this many training steps (0: only at the end)."""
    protocol: str = "retrieval"
    """A protocol of pipeline.eval.protocols: 'retrieval' (every item queries the rest),
    'vggface2' or 'ijbc' (IJB-C or IJB-B, template verification and identification)."""
    ks: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    """Recall@K cut-offs."""
    batch_size: int = 128
    """Images per forward pass during embedding extraction."""
    query_block: int = 4096
    """Queries searched at once in FAISS."""
    output_dir: str = ""
    """Where embeddings and metrics.json go ('' : <train.output_dir>/eval)."""
    full_map: bool = True
    """Also compute mAP over the full ranking (VGGFace2's metric): one more pass over the
    query x gallery similarities, in blocks (the other metrics read the kNN lists only)."""
    ijbc_protocol: str = ""
    """protocol=ijbc: the folder with the pair and 1:N lists, either a shard split directory
    (pairs.parquet, gallery_G1/G2.parquet, probe_mixed.parquet from make-shards) or IJB-C's
    meta/ folder; '' : the directory of data.eval_urls."""
    ijbc_flip: bool = True
    """protocol=ijbc: add the feature of each face's horizontal mirror to its own, before any
    normalisation (insightface's flip test, F2 in its tables; false: F0)."""
    ijbc_norm_score: bool = True
    """protocol=ijbc: keep each image feature's norm (the model's embedding before its L2
    normalisation) as a quality weight in pooling (insightface's N1); false: L2-normalise each
    image feature first (N0)."""
    ijbc_det_score: bool = True
    """protocol=ijbc: weight each image feature by its detector score, the catalog's det_score
    column (insightface's D1); a split without that column is evaluated with weight 1 (D0) and
    the metrics' names and record say so."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval.every", self.every, "must be >= 0")
        # Which names exist is the protocol registry's rule (pipeline.eval.protocols), checked
        # with the other cross-section rules when a config loads.
        _check(bool(self.protocol), "eval.protocol", self.protocol, "must name a protocol")
        _check(
            len(self.ks) > 0 and all(k >= 1 for k in self.ks),
            "eval.ks",
            self.ks,
            "must be a non-empty list of positive ints",
        )
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")
        _check(self.query_block >= 1, "eval.query_block", self.query_block, "must be >= 1")


@dataclass
class TrackingConfig:
    """MLflow."""

    enabled: bool = True
    """False: log nothing (no MLflow run is created)."""
    uri: str = ""
    """Tracking URI; '' uses $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir."""
    experiment: str = "smoothap"
    """MLflow experiment (created if missing)."""
    run_name: str = ""
    """Display name of the run ('' : MLflow picks one)."""
    register_model: str = ""
    """At the end of training, log the model as an MLflow model (images in, L2-normalised
    embeddings out) and register it under this name, a new version per run ('' : log the
    weights file only)."""
    system_metrics_interval_s: float = 10.0
    """Each host's first rank samples CPU, memory (and GPU) into the run every this many
    seconds, as system/<host>/... (0 : off)."""

    def __post_init__(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", self.experiment, "must not be empty")
        _check(
            self.system_metrics_interval_s >= 0,
            "tracking.system_metrics_interval_s",
            self.system_metrics_interval_s,
            "must be >= 0 seconds (0: off)",
        )


@dataclass
class LaunchConfig:
    """SLURM resources (submitit); site defaults come from ``conf/cluster/<name>.yaml``."""

    nodes: int = 1
    gpus_per_node: int = 8
    """GPUs requested per node (0 on a CPU-only partition)."""
    tasks_per_node: int = 0
    """0: one task per GPU (one task when gpus_per_node is 0). Set it on CPU-only partitions."""
    cpus_per_task: int = 8
    """CPU cores per task (DataLoader workers + the main process)."""
    mem_gb: int = 0
    """Memory per node in GB; 0: the partition's default."""
    partition: str = ""
    """'' : the cluster's default partition."""
    time_minutes: int = 60
    """Time limit of one job; a longer training is requeued from its checkpoint."""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM signals the job (requeue)."""
    max_timeouts: int = 20
    """Requeues after reaching the time limit before giving up (preemptions do not count)."""
    folder: str = "runs/slurm/%j"
    """submitit output folder (logs per rank, pickles); %j is the job id."""
    job_name: str = ""
    """'' : smoothap-<command>."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before the tasks start (module load, env vars)."""

    def __post_init__(self) -> None:
        _check(self.nodes >= 1, "launch.nodes", self.nodes, "must be >= 1")
        _check(self.gpus_per_node >= 0, "launch.gpus_per_node", self.gpus_per_node, "must be >= 0")
        _check(
            self.tasks_per_node >= 0, "launch.tasks_per_node", self.tasks_per_node, "must be >= 0"
        )
        _check(self.cpus_per_task >= 1, "launch.cpus_per_task", self.cpus_per_task, "must be >= 1")
        _check(self.mem_gb >= 0, "launch.mem_gb", self.mem_gb, "must be >= 0 (0: default)")
        _check(self.time_minutes >= 1, "launch.time_minutes", self.time_minutes, "must be >= 1")
        _check(
            0 <= self.signal_delay_s < 60 * self.time_minutes,
            "launch.signal_delay_s",
            self.signal_delay_s,
            f"must be >= 0 and shorter than the time limit ({60 * self.time_minutes} s)",
        )
        _check(self.max_timeouts >= 0, "launch.max_timeouts", self.max_timeouts, "must be >= 0")
        _check(bool(self.folder), "launch.folder", self.folder, "must name a folder")


@dataclass
class RunConfig:
    """The whole run; components receive only their own section."""

    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def to_dict(cfg: Any) -> dict:
    """The config as plain dicts and lists (what YAML and MLflow params need)."""
    return dataclasses.asdict(cfg)
