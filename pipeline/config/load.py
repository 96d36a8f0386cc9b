"""Loading a run config: typed defaults -> YAML file -> dotted ``key=value`` overrides.

The schemas live in :mod:`pipeline.config.schema`, :mod:`pipeline.config.schema_train` and
:mod:`pipeline.config.schema_services`; this module turns files and overrides into a
:class:`~pipeline.config.runconfig.RunConfig`, saves it, and flattens it for MLflow. Unknown keys and
wrong types are errors that name the key and list the valid ones.

Config files shipped with the package (``pipeline/conf/``, also reachable as ``conf/`` in a
checkout) can be named as ``conf/...`` from any directory, so a non-editable install runs
``pipeline train --config conf/experiments/sop.yaml`` too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.runconfig import RunConfig, to_dict
from pipeline.config.schema import ConfigError
from pipeline.config.schema_train import ModelConfig
from pipeline.errors import UserError
from pipeline.secrets import redact_tree, scrub_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


DEFAULTS_PATH = CONF_DIR / "defaults.yaml"


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


class DuplicateKeyError(UserError, yaml.YAMLError):
    """A YAML mapping names one key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last value silently, so an edit further up a long file would have no effect)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, tuple[int, int]] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            here = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                first = seen[key]
                where = (
                    f"line {first[0]} and line {here[0]}"
                    if first[0] != here[0]
                    else f"line {here[0]}, columns {first[1]} and {here[1]}"
                )
                raise DuplicateKeyError(f"key {key!r} is given twice, on {where}: keep one")
            seen.setdefault(key, here)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(
    path: Path, name: str, must_hold: str, error: type[Exception] = ConfigError
) -> dict:
    """The mapping in the YAML file ``path`` ({} for an empty file). Raises ``error`` that
    calls the file ``name`` when it is not valid YAML or holds no mapping (``must_hold``)."""
    try:
        loaded = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
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


SECRET_WORDS = ("secret", "password", "token", "access_key", "credential")
"""A config key naming one of these would hold a credential, which a config file (saved with
the run, logged to MLflow) must never carry."""


def refuse_secret_key(full: str) -> None:
    """Refuse, in one line, a config key that would hold a credential."""
    if any(word in full.rsplit(".", 1)[-1].lower() for word in SECRET_WORDS):
        raise ConfigError(
            f"config key {full!r} would hold a credential, and config files are saved with the "
            "run and logged: remove it and use the environment or the tool's own credential "
            "file (for an object store AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "AWS_PROFILE with ~/.aws/credentials)"
        )


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in hints or key not in names:
            refuse_secret_key(full)
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


def _list_element_message(text: str, path: list[str], items: list) -> str:
    key = ".".join(path)
    example = yaml.safe_dump(items, default_flow_style=True, width=10_000).strip()
    return (
        f"override {text!r}: {key} is a list, and an override replaces a whole value, not one "
        f"element; pass the whole list, e.g. {key}={example!r} (quoted for the shell), or "
        "change it in the config file"
    )


def _apply_override(tree: dict, path: list[str], value: Any, text: str) -> None:
    node: Any = tree
    cls: Any = RunConfig
    for depth, part in enumerate(path[:-1]):
        names = [f.name for f in dataclasses.fields(cls)]
        prefix = ".".join(path[:depth])
        if part in names and isinstance(node.get(part), list):
            raise ConfigError(_list_element_message(text, path[: depth + 1], node[part]))
        if part not in names or not isinstance(node.get(part), dict):
            raise ConfigError(
                f"override {text!r}: unknown config key {'.'.join(path[: depth + 1])!r}; "
                f"valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}"
            )
        cls = typing.get_type_hints(cls)[part]
        node = node[part]
    names = [f.name for f in dataclasses.fields(cls)]
    if path[-1] not in names:
        refuse_secret_key(".".join(path))
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
    """Defaults (dataclass defaults, then ``conf/defaults.yaml``) -> YAML ``path`` -> overrides.

    Parses and type-checks (unknown keys, wrong types, each section's own rules); the rules
    across sections are :func:`pipeline.config.rules.load_checked`'s, which entry points use."""
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
    scrub_config(cfg)  # credentials in URIs move to the environment, out of the config
    return cfg


LEGACY_WEIGHTS = "checkpoint="
"""The old spelling of ``--weights PATH`` among the overrides (still read, with a message)."""


def split_weights(
    weights: str | None, tokens: list[str] | tuple[str, ...]
) -> tuple[str, list[str]]:
    """The trained weights (``--weights PATH``, made absolute) and the config overrides.

    ``pipeline evaluate``, ``export`` and ``build-gallery`` and the SLURM launcher take the
    weights this way; the path must be given once and exist. The old spelling
    ``checkpoint=PATH`` among the overrides still works and prints a deprecation message.
    """
    legacy = [t.removeprefix(LEGACY_WEIGHTS) for t in tokens if t.startswith(LEGACY_WEIGHTS)]
    rest = [t for t in tokens if not t.startswith(LEGACY_WEIGHTS)]
    if legacy:
        print(
            f"deprecated: {LEGACY_WEIGHTS}PATH names the weights as --weights PATH now "
            f"(--weights {legacy[0]}); the old spelling will stop working",
            file=sys.stderr,
        )
    found = ([weights] if weights is not None else []) + legacy
    if len(found) != 1 or not found[0]:
        raise ConfigError(
            "pass the trained weights once, as --weights PATH (a run's model.safetensors or "
            "its checkpoints/ directory), e.g. "
            "`pipeline evaluate --config conf/demo.yaml --weights runs/demo/model.safetensors`"
        )
    path = Path(found[0]).resolve()
    if not path.exists():
        raise ConfigError(f"--weights {found[0]!r} does not exist ({path})")
    return str(path), rest


def add_config_arguments(parser: argparse.ArgumentParser, overrides_help: str) -> None:
    """``--weights PATH``, ``--config YAML`` (optional: the typed defaults without it) and the
    positional ``KEY=VALUE`` overrides, as the commands that load a trained model take them."""
    parser.add_argument(
        "--weights",
        default=None,
        metavar="PATH",
        help="the trained weights: a run's model.safetensors or its checkpoints/ directory",
    )
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
    Path(path).write_text(yaml.safe_dump(redact_tree(to_dict(cfg)), sort_keys=False))


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
