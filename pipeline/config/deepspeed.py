"""The DeepSpeed file a run may name (``train.deepspeed_config``), read and checked against the
run's own config: the keys the pipeline derives are refused, the ZeRO stage and autocast agree."""

from __future__ import annotations

import yaml

from pipeline.config.load import CONF_DIR, UniqueKeyLoader, resolve_conf_path
from pipeline.config.schema import ConfigError
from pipeline.config.schema_train import TrainConfig

DEEPSPEED_DIR = CONF_DIR / "deepspeed"


# DeepSpeed keys the pipeline derives from its own config (pipeline.train.engine generates
# them); a train.deepspeed_config file may not set them. Key -> where the value comes from.
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "sampler.classes_per_batch x sampler.samples_per_class x ranks",
    "train_micro_batch_size_per_gpu": "sampler.classes_per_batch x sampler.samples_per_class",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps (must be 1)",
    "gradient_clipping": "train.gradient_clipping",
    "optimizer": "optim.*",
    "scheduler": "optim.*",
    "fp16": "train.precision (fp16 is not supported: use bf16)",
    "bf16": "train.precision (bf16 runs as torch_autocast)",
}


def read_deepspeed_file(train_cfg: TrainConfig) -> dict:
    """The settings of ``train.deepspeed_config`` ({} when unset), checked against ``train.*``:
    the file exists and holds a mapping, sets none of ``DEEPSPEED_OWNED_KEYS``, agrees with
    ``train.zero_stage`` and sets ``torch_autocast`` only for bf16 (and only its module list)."""
    if not train_cfg.deepspeed_config:
        return {}
    key = "train.deepspeed_config"
    path = resolve_conf_path(train_cfg.deepspeed_config)
    where = f"{key}={train_cfg.deepspeed_config!r}"
    if not path.is_file():
        shipped = ", ".join(
            f"conf/deepspeed/{p.name}" for p in sorted(DEEPSPEED_DIR.glob("*.yaml"))
        )
        raise ConfigError(
            f"{where}: the file does not exist ({path}); name an existing YAML/JSON file "
            f"(shipped: {shipped}) or set {key}=''"
        )
    try:
        # YAML is a superset of JSON; a key given twice is an error here too.
        extra = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {path} is not valid YAML/JSON: {_one_line(e)}") from e
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}: {path} must hold a mapping of DeepSpeed settings")
    if "gradient_accumulation_steps" in extra:
        raise ConfigError(
            f"{where} sets gradient_accumulation_steps={extra['gradient_accumulation_steps']!r}: "
            "refused, Smooth-AP ranks every query against the whole batch, so accumulating "
            "micro-batches changes the objective; remove it and set train.chunk_size (the "
            "gradient cache) to fit a large batch in memory"
        )
    for name, source in DEEPSPEED_OWNED_KEYS.items():
        if name in extra:
            raise ConfigError(
                f"{where} sets {name!r}, which the pipeline derives from {source}; "
                f"remove it from the file and set {source} instead"
            )
    zero = extra.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be a mapping, got {zero!r}")
    stage = zero.get("stage", train_cfg.zero_stage)
    if stage != train_cfg.zero_stage:
        raise ConfigError(
            f"{where} sets zero_optimization.stage={stage} but train.zero_stage="
            f"{train_cfg.zero_stage}: they must agree; set train.zero_stage={stage} or use "
            f"conf/deepspeed/zero{train_cfg.zero_stage}.yaml"
        )
    autocast = extra.get("torch_autocast")
    if autocast is not None:
        if train_cfg.precision == "fp32":
            raise ConfigError(
                f"{where} sets torch_autocast, but train.precision='fp32' runs without "
                "autocast; set train.precision=bf16 or use a file without torch_autocast"
            )
        owned = sorted({"enabled", "dtype"} & set(autocast or {}))
        if owned:
            raise ConfigError(
                f"{where} sets torch_autocast.{owned[0]}, which the pipeline derives from "
                "train.precision; keep only lower_precision_safe_modules in the file"
            )
    return extra


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
