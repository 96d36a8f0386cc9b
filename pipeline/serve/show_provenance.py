"""``pipeline provenance PATH``: where a weights file, checkpoint, export or gallery comes from.

    pipeline provenance runs/demo/model.safetensors
    pipeline provenance runs/demo/checkpoints            # the tag 'latest' names now
    pipeline provenance model.onnx --json                # its <stem>.preprocessing.json
    pipeline provenance gallery/

Prints one ``key: value`` line per entry (``--json``: one JSON object): what the path is, the
weights' identity (``pipeline.weights.weights_sha256``: computed from the tensors where the
path holds them, else as recorded), the run id, step, config and catalog digests, code version
and preprocessing where recorded, and under ``missing`` what is not known (a plain state dict
someone saved records none of it; it still loads everywhere).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.serve.export import EXTENSIONS, FORMATS, SPEC_FORMAT, spec_path
from pipeline.serve.gallery_files import MANIFEST_FILE, read_manifest
from pipeline.weights import (
    IDENTITY_KEY,
    MODEL_STATES,
    PROVENANCE_KEYS,
    read_client_state,
    read_metadata,
    read_state_dict,
    read_trained_weights,
    resolve_checkpoint,
    weights_sha256,
)

# Recorded as JSON text in a weights file's metadata: shown as JSON values.
_JSON_ENTRIES = ("catalog_sha256", "preprocessing", "architecture")


class ProvenanceError(UserError, ValueError):
    """A path that holds no weights, checkpoint, export or gallery."""


def _weights_file(path: Path) -> dict[str, Any]:
    meta = read_metadata(path)
    state, _ = read_state_dict(path)
    out: dict[str, Any] = {"kind": "safetensors weights", "path": str(path)}
    for key in (*PROVENANCE_KEYS, "architecture"):
        if key in meta:
            value = meta[key]
            out[key] = json.loads(value) if key in _JSON_ENTRIES else value
    if "step" in out:
        out["step"] = int(out["step"])
    computed = weights_sha256(state)
    if out.get(IDENTITY_KEY, computed) != computed:
        # The tensors were changed after the file was written: its metadata describes others.
        out["recorded_weights_sha256"] = out[IDENTITY_KEY]
        out["warning"] = "the tensors do not match the recorded identity: metadata not theirs"
    out[IDENTITY_KEY] = computed
    return out


def _checkpoint(path: Path) -> dict[str, Any]:
    tag, root = resolve_checkpoint(path)
    _, arch, _, origin = read_trained_weights(tag)
    client = read_client_state(tag / MODEL_STATES)
    out: dict[str, Any] = {"kind": "DeepSpeed checkpoint", "path": str(tag)}
    if root:
        out["resolved_from"] = root
    out[IDENTITY_KEY] = origin.weights_sha256
    if "mlflow_run_id" in client:
        out["run_id"] = client["mlflow_run_id"]
    if origin.step is not None:
        out["step"] = origin.step
    if arch is not None:
        out["architecture"] = arch
    return out


def _record(kind: str, path: Path, record: dict[str, Any] | None, **extra: Any) -> dict:
    out: dict[str, Any] = {"kind": kind, "path": str(path), **extra}
    if record:
        out["weights_path"] = record.get("path")
        out |= {k: record[k] for k in (IDENTITY_KEY, "run_id", "step") if record.get(k) is not None}
    return out


def _export(model_file: Path, spec_file: Path) -> dict[str, Any]:
    spec = json.loads(spec_file.read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ProvenanceError(
            f"{spec_file}: format {spec.get('format')!r} is not {SPEC_FORMAT!r}; pass the "
            "<stem>.preprocessing.json that `pipeline export` wrote"
        )
    kind = "ONNX export" if model_file.suffix.lower() == ".onnx" else "TorchScript export"
    out = _record(kind, model_file, spec.get("weights"), spec=str(spec_file))
    out["preprocessing"] = {k: v for k, v in spec.items() if k != "weights"}
    if kind == "TorchScript export" and model_file.is_file():
        # Its tensors are at hand: the identity is checked, not only read.
        computed = weights_sha256(torch.jit.load(str(model_file), map_location="cpu").state_dict())
        out["tensors_match_record"] = computed == out.get(IDENTITY_KEY)
        out[IDENTITY_KEY] = computed
    return out


def provenance_of(path: str | Path) -> dict[str, Any]:
    """What is known of the origin of the weights ``path`` holds or was made from; ``missing``
    lists the provenance entries it does not record."""
    path = Path(path)
    if not path.exists():
        raise ProvenanceError(
            f"{str(path)!r} does not exist; pass a weights file, checkpoint, "
            "export or gallery folder"
        )
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        manifest = read_manifest(path)
        out = _record("gallery", path, manifest.get("weights"))
        out.setdefault("weights_path", manifest.get("checkpoint"))
    elif path.is_dir():
        out = _checkpoint(path)
    elif path.suffix == ".safetensors":
        out = _weights_file(path)
    elif path.name.endswith(".preprocessing.json"):
        stem = path.name.removesuffix(".preprocessing.json")
        models = [path.with_name(stem + e) for e, f in EXTENSIONS.items() if f in FORMATS]
        out = _export(next((m for m in models if m.is_file()), path.with_name(stem)), path)
    elif spec_path(path).is_file():
        out = _export(path, spec_path(path))
    elif path.suffix.lower() == ".onnx":
        raise ProvenanceError(
            f"{path}: an ONNX file keeps no provenance of its own and {spec_path(path).name} "
            "is not beside it; pass the export's preprocessing JSON"
        )
    else:
        state, _ = read_state_dict(path)  # a plain torch state dict: its identity only
        out = {"kind": "torch state dict", "path": str(path), IDENTITY_KEY: weights_sha256(state)}
    wanted = PROVENANCE_KEYS if out["kind"] != "gallery" else (IDENTITY_KEY, "run_id", "step")
    out["missing"] = [k for k in wanted if k not in out]
    return out


def format_lines(record: dict[str, Any]) -> list[str]:
    """One ``key: value`` line per entry (mappings and lists as compact JSON)."""
    width = max(len(k) for k in record)

    def text(v: Any) -> str:
        return json.dumps(v) if isinstance(v, (dict, list)) or v is None else str(v)

    return [f"{k:<{width}}  {text(v)}" for k, v in record.items()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        help="a .safetensors file, a checkpoint tag or root, an export (.onnx/.pt beside its "
        "preprocessing JSON) or a gallery folder",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    record = provenance_of(args.path)
    print(json.dumps(record, indent=2) if args.json else "\n".join(format_lines(record)))
    return 0
