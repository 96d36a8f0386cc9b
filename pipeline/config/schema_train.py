"""The training sections of the run configuration: ``model``, ``loss``, ``optim``, ``train``.

Each is a typed dataclass that validates its own fields (``ConfigError`` naming the key, the
value and the rule); the other sections are in ``pipeline.config.schema``,
``pipeline.config.schema_services`` and ``pipeline.config.runconfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.schema import check


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
        check(bool(self.backbone), "model.backbone", self.backbone, "name a timm model")
        check(self.embedding_dim > 0, "model.embedding_dim", self.embedding_dim, "must be > 0")
        check(self.head_lr_mult > 0, "model.head_lr_mult", self.head_lr_mult, "must be > 0")


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
        check(self.temperature > 0, "loss.temperature", self.temperature, "must be > 0")
        check(
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
        check(
            self.name in ("adam", "adamw", "sgd"), "optim.name", self.name, "use adam, adamw or sgd"
        )
        check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        check(
            self.scheduler in ("constant", "step", "cosine"),
            "optim.scheduler",
            self.scheduler,
            "use constant, step or cosine",
        )
        check(self.step_size >= 1, "optim.step_size", self.step_size, "must be >= 1")
        check(0 < self.gamma <= 1, "optim.gamma", self.gamma, "must be in (0, 1]")
        check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")


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
    """How long a collective (gloo/nccl) may wait for the other ranks before the job fails,
    outside the steady training steps: start-up, the first steps, evaluation, checkpoint
    writes, the final export. Bounded so that a lost host ends the job (to be requeued and
    resumed) instead of hanging it for gloo's default 30 minutes; long enough for the slowest
    evaluation or checkpoint of a run, which the other ranks wait for."""
    step_timeout_s: float = 100.0
    """The collective timeout of the steady training steps (torchtitan's default), so that a
    host lost while the job trains ends it within about this long; at most
    train.collective_timeout_s. The slowest steady step, data loading included, must fit."""
    step_timeout_after: int = 2
    """Steps that still wait up to train.collective_timeout_s at the start of each process
    (a resumed one too) and of each epoch: the first steps allocate memory and start the
    data loader's workers, which fill their shuffle buffers before the first batch."""
    stop_grace_s: float = 300.0
    """After SIGTERM/SIGUSR1 the run finishes its step, checkpoints and exits; if that has not
    happened after this many seconds (e.g. a collective with a lost rank), it exits at once."""
    init_weights: str = ""
    """Start from these trained weights (a run's model.safetensors or its checkpoints/
    directory) instead of train.seed's random ones: every tensor of the model, with a new
    optimizer and schedule at step 0. How a finished run trains on in a new output_dir."""
    continue_finished: bool = False
    """Let a finished run (its output_dir holds result.json) train on in place to a larger
    train.epochs or sampler.steps_per_epoch, from its final checkpoint (which is kept); any
    other change to what trains is refused even so (use init_weights in a new output_dir)."""

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        check(
            self.collective_timeout_s > 0,
            "train.collective_timeout_s",
            self.collective_timeout_s,
            "must be > 0 seconds",
        )
        check(
            0 < self.step_timeout_s <= self.collective_timeout_s,
            "train.step_timeout_s",
            self.step_timeout_s,
            f"must be > 0 seconds and at most train.collective_timeout_s="
            f"{self.collective_timeout_s:g} (the long timeout of start-up, evaluation and "
            "checkpoints); lower the one or raise the other",
        )
        check(
            self.step_timeout_after >= 0,
            "train.step_timeout_after",
            self.step_timeout_after,
            "must be >= 0 steps",
        )
        check(self.stop_grace_s > 0, "train.stop_grace_s", self.stop_grace_s, "must be > 0")
        check(self.zero_stage in (0, 1, 2), "train.zero_stage", self.zero_stage, "use 0, 1 or 2")
        check(
            self.precision in ("auto", "bf16", "fp32"),
            "train.precision",
            self.precision,
            "use auto, bf16 or fp32",
        )
        check(
            self.gradient_clipping >= 0,
            "train.gradient_clipping",
            self.gradient_clipping,
            "must be >= 0",
        )
        check(
            self.gradient_accumulation_steps == 1,
            "train.gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "must be 1: Smooth-AP ranks every query against the whole batch, so accumulating "
            "micro-batches changes the objective; set train.chunk_size to fit a large batch "
            "in memory with the gradient cache instead",
        )
        check(self.chunk_size >= 0, "train.chunk_size", self.chunk_size, "must be >= 0")
        check(
            self.checkpoint_every >= 1,
            "train.checkpoint_every",
            self.checkpoint_every,
            "must be >= 1",
        )
        check(
            self.keep_checkpoints >= 1,
            "train.keep_checkpoints",
            self.keep_checkpoints,
            "must be >= 1",
        )
        check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
