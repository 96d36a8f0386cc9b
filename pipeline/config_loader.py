"""Loading a run config: typed defaults -> YAML file -> dotted ``key=value`` overrides.

The schemas live in :mod:`pipeline.config`; this module turns files and overrides into a
:class:`~pipeline.config.RunConfig`, saves it, and flattens it for MLflow. Unknown keys and
wrong types are errors that name the key and list the valid ones.

Config files shipped with the package (``pipeline/conf/``, also reachable as ``conf/`` in a
checkout) can be named as ``conf/...`` from any directory, so a non-editable install runs
``pipeline train --config conf/experiments/sop.yaml`` too.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, ModelConfig, RunConfig, TrainConfig, to_dict

CONF_DIR = Path(__file__).resolve().parent / "conf"
DEFAULTS_PATH = CONF_DIR / "defaults.yaml"
DEEPSPEED_DIR = CONF_DIR / "deepspeed"


def resolve_conf_path(path: str | Path) -> Path:
    """``path`` as given when it exists; else, for ``conf/...``, the file shipped in the
    package (what a wheel installed outside the repository has)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts
    if parts and parts[0] == "conf":
        shipped = CONF_DIR.joinpath(*parts[1:])
        if shipped.exists():
            return shipped
    return p


def read_yaml_mapping(
    path: Path, name: str, must_hold: str, error: type[Exception] = ConfigError
) -> dict:
    """The mapping in the YAML file ``path`` ({} for an empty file). Raises ``error`` that
    calls the file ``name`` when it is not valid YAML or holds no mapping (``must_hold``)."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{name} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise error(f"{name} must hold {must_hold}")
    return loaded


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key)
    return _coerce_scalar(value, tp, key)


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the first arm of the union ``tp`` that accepts it (``None`` for Optional)."""
    for arm in typing.get_args(tp):
        if arm is type(None) and value is None:
            return None
        try:
            return _coerce(value, arm, key)
        except ConfigError:
            pass
    raise ConfigError(f"{key}: {value!r} matches none of {tp}")


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but ``true`` is no answer to an int or float field.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """``value`` as bool, int, float, str or Any; no conversion between them except to float."""
    if tp is Any:
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and _is_number(value) and isinstance(value, int):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is float:
        if _is_number(value):
            return float(value)
        # YAML 1.1 reads 1e-5 (no dot) as a string; accept what float() reads.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in hints or key not in names:
            raise ConfigError(
                f"unknown config key {full!r}; valid keys{' of ' + prefix if prefix else ''}: "
                + ", ".join(names)
            )
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} is not of the form key=value (e.g. loss.temperature=0.05)"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    # YAML parsing gives numbers, booleans and lists ([1,4,16]) their types.
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.split("."), value


def _apply_override(tree: dict, path: list[str], value: Any, text: str) -> None:
    node: Any = tree
    cls: Any = RunConfig
    for depth, part in enumerate(path[:-1]):
        names = [f.name for f in dataclasses.fields(cls)]
        prefix = ".".join(path[:depth])
        if part not in names or not isinstance(node.get(part), dict):
            raise ConfigError(
                f"override {text!r}: unknown config key {'.'.join(path[: depth + 1])!r}; "
                f"valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}"
            )
        cls = typing.get_type_hints(cls)[part]
        node = node[part]
    names = [f.name for f in dataclasses.fields(cls)]
    if path[-1] not in names:
        prefix = ".".join(path[:-1])
        raise ConfigError(
            f"override {text!r}: unknown config key {'.'.join(path)!r}; "
            f"valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}"
        )
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    defaults: str | Path | None = DEFAULTS_PATH,
) -> RunConfig:
    """Defaults (dataclass defaults, then ``conf/defaults.yaml``) -> YAML ``path`` -> overrides."""
    tree = to_dict(RunConfig())
    for source in (defaults, path):
        if source is None:
            continue
        source = resolve_conf_path(source)
        if not source.is_file():
            raise ConfigError(f"config file {str(source)!r} does not exist; pass an existing YAML")
        loaded = read_yaml_mapping(
            source, f"config file {str(source)!r}", "a mapping at the top level"
        )
        # Validate the file's keys before merging, so an error names the file.
        try:
            _build(RunConfig, _merge(to_dict(RunConfig()), loaded), "")
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from e
        tree = _merge(tree, loaded)
    for text in overrides:
        keys, value = _parse_override(text)
        _apply_override(tree, keys, value, text)
    try:
        cfg = _build(RunConfig, tree, "")
    except TypeError as e:  # a dataclass refused its kwargs
        raise ConfigError(str(e)) from e
    check(cfg)
    return cfg


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
        extra = yaml.safe_load(path.read_text()) or {}  # YAML is a superset of JSON
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


def check(cfg: RunConfig) -> None:
    """Rules across sections, checked when a config loads (before any engine, data or job):
    each broken rule raises a one-line ConfigError naming the keys, values, rule and fix.

    Rules that need the shards or the world size are in :mod:`pipeline.preflight`.
    """
    data, sampler, train, model, ev, launch = (
        cfg.data,
        cfg.sampler,
        cfg.train,
        cfg.model,
        cfg.eval,
        cfg.launch,
    )
    # pipeline.data.stream: each DataLoader worker owns whole P x K streams (the rule lives
    # with the dealing of shards to streams).
    from pipeline.data.dealing import streams_per_rank

    try:
        streams_per_rank(data, sampler)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # The BatchNorm policy's own rules (frozen vs synchronised, the gradient cache's chunks).
    from pipeline.train.batchnorm import check_config as check_batchnorm

    check_batchnorm(
        model, chunk_size=train.chunk_size, batch_size_per_gpu=sampler.batch_size_per_gpu
    )
    read_deepspeed_file(train)
    if ev.ijbc_protocol and ev.protocol != "ijbc":
        raise ConfigError(
            f"eval.ijbc_protocol={ev.ijbc_protocol!r} is set but eval.protocol={ev.protocol!r} "
            "never reads it; set eval.protocol=ijbc or eval.ijbc_protocol=''"
        )
    if ev.protocol == "ijbc" and not ev.ijbc_protocol and _is_remote(data.eval_urls):
        raise ConfigError(
            f"eval.protocol=ijbc with remote data.eval_urls={data.eval_urls!r}: the IJB-C pair "
            "lists and index.parquet are read from a local directory; copy the split's "
            "pairs.parquet and index.parquet locally and set eval.ijbc_protocol=DIR"
        )
    if launch.gpus_per_node and launch.tasks_per_node > launch.gpus_per_node:
        raise ConfigError(
            f"launch.tasks_per_node={launch.tasks_per_node} with launch.gpus_per_node="
            f"{launch.gpus_per_node}: every task (rank) needs a GPU of its own; set "
            f"launch.tasks_per_node<={launch.gpus_per_node} (0: one per GPU)"
        )


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def split_checkpoint(tokens: list[str] | tuple[str, ...]) -> tuple[str, list[str]]:
    """``checkpoint=PATH`` (made absolute) and the remaining config overrides.

    ``pipeline evaluate`` and its SLURM launcher take the trained weights this way; the path
    must be given once and exist.
    """
    found = [t.split("=", 1)[1] for t in tokens if t.startswith("checkpoint=")]
    rest = [t for t in tokens if not t.startswith("checkpoint=")]
    if len(found) != 1 or not found[0]:
        raise ConfigError(
            "pass the trained weights once as checkpoint=PATH (a run's model.safetensors or "
            "its checkpoints/ directory), e.g. "
            "`pipeline evaluate --config conf/demo.yaml checkpoint=runs/demo/model.safetensors`"
        )
    path = Path(found[0]).resolve()
    if not path.exists():
        raise ConfigError(f"checkpoint={found[0]!r} does not exist ({path})")
    return str(path), rest


def add_config_arguments(parser: argparse.ArgumentParser, overrides_help: str) -> None:
    """``--config YAML`` (optional: the typed defaults without it) and the positional
    ``KEY=VALUE`` overrides, as the commands that load a trained model take them."""
    parser.add_argument("--config", default=None, help="experiment YAML (e.g. conf/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)


def named_model(config: str | None, overrides: list[str], cfg: RunConfig) -> ModelConfig | None:
    """``cfg.model`` when the command line names a model (a config file or a ``model.*``
    override), else None. A checkpoint records its architecture; a named one must agree."""
    names_model = config is not None or any(o.startswith("model.") for o in overrides)
    return cfg.model if names_model else None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again by ``load_config``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}} -> {'a.b': 1}``; lists of mappings get an index (MLflow params)."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                flat.update(flatten(item, f"{key}.{i}."))
        else:
            flat[key] = v
    return flat
