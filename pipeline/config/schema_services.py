"""The service sections of the run configuration: ``eval``, ``tracking``, ``launch``.

Each is a typed dataclass that validates its own fields (``ConfigError`` naming the key, the
value and the rule); the other sections are in ``pipeline.config.schema``,
``pipeline.config.schema_train`` and ``pipeline.config.runconfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.schema import check


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
        check(self.every >= 0, "eval.every", self.every, "must be >= 0")
        # Which names exist is the protocol registry's rule (pipeline.eval.protocols), checked
        # with the other cross-section rules when a config loads.
        check(bool(self.protocol), "eval.protocol", self.protocol, "must name a protocol")
        check(
            len(self.ks) > 0 and all(k >= 1 for k in self.ks),
            "eval.ks",
            self.ks,
            "must be a non-empty list of positive ints",
        )
        check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")
        check(self.query_block >= 1, "eval.query_block", self.query_block, "must be >= 1")


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
        check(bool(self.experiment), "tracking.experiment", self.experiment, "must not be empty")
        check(
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
        check(self.nodes >= 1, "launch.nodes", self.nodes, "must be >= 1")
        check(self.gpus_per_node >= 0, "launch.gpus_per_node", self.gpus_per_node, "must be >= 0")
        check(
            self.tasks_per_node >= 0, "launch.tasks_per_node", self.tasks_per_node, "must be >= 0"
        )
        check(self.cpus_per_task >= 1, "launch.cpus_per_task", self.cpus_per_task, "must be >= 1")
        check(self.mem_gb >= 0, "launch.mem_gb", self.mem_gb, "must be >= 0 (0: default)")
        check(self.time_minutes >= 1, "launch.time_minutes", self.time_minutes, "must be >= 1")
        check(
            0 <= self.signal_delay_s < 60 * self.time_minutes,
            "launch.signal_delay_s",
            self.signal_delay_s,
            f"must be >= 0 and shorter than the time limit ({60 * self.time_minutes} s)",
        )
        check(self.max_timeouts >= 0, "launch.max_timeouts", self.max_timeouts, "must be >= 0")
        check(bool(self.folder), "launch.folder", self.folder, "must name a folder")
