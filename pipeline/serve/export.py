"""``pipeline export``: a trained model as ONNX or TorchScript, or as an MLflow pyfunc model.

    pipeline export --config conf/demo.yaml --weights runs/demo/model.safetensors \
        --format onnx --out model.onnx
    pipeline export --config conf/demo.yaml --weights ... --mlflow --register-model demo-embedder

The exported graph is the whole :class:`pipeline.model.EmbeddingModel` (backbone, head and the
L2 normalisation): float32 NCHW images of ``data.image_size`` in, unit-norm embeddings out, any
batch size. Beside it goes ``<stem>.preprocessing.json`` (:func:`preprocessing_spec`): what a
caller must do to an image first (the eval transform of ``pipeline.data.transforms``);
``pipeline.serve.runtime`` implements it without torch. The spec's ``weights`` entry names the
weights exported (``pipeline.weights.model_weights_record``: identity, file or checkpoint tag,
run id and step); the MLflow model carries the same record in its metadata.

The MLflow model (:func:`log_mlflow_model`) holds the ONNX graph, the spec and
``pipeline/serve/runtime.py`` as its code: encoded image bytes in, embeddings out, preprocessing
inside, and it needs onnxruntime, NumPy and Pillow only (the requirements are given explicitly,
so MLflow never resolves packages or downloads anything).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import pipeline
from pipeline.config.load import add_config_arguments, load_config, named_model, split_weights
from pipeline.config.runconfig import RunConfig
from pipeline.config.schema import DataConfig
from pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_for_weights,
    crop_of,
    draft_side,
)
from pipeline.errors import UserError
from pipeline.model import load_trained_model
from pipeline.tracking.mlflow import MlflowTracker, ui_command
from pipeline.weights import IDENTITY_KEY, model_weights_record

FORMATS = ("onnx", "torchscript")
SPEC_FORMAT = "smoothap-preprocessing-v1"
"""Also in ``pipeline.serve.runtime``, which imports nothing from the project (a test keeps them equal)."""
IMAGE_COLUMN = "image"
"""The MLflow model's input column; also in ``pipeline.serve.runtime`` (a test keeps them equal)."""
RUNTIME_CODE = Path(__file__).with_name("runtime.py")
"""The MLflow model's code, copied into the model. Read as a file, not imported: it imports
mlflow at its top, which export and training load only when they log a model."""
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
# Exported with batch 2: torch.export specialises a dimension of size 1 to a constant.
_EXAMPLE_BATCH = 2


class ExportError(UserError, ValueError):
    """Bad export request; the message names the flag or file, the rule and the fix."""


# File extensions and what they hold: a name saying one thing over a file holding another
# misleads whoever loads it (an ONNX runtime fails on a TorchScript zip with a parse error).
EXTENSIONS = {
    ".onnx": "onnx",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".jit": "torchscript",
    ".safetensors": "safetensors weights",
    ".json": "JSON",
}


def _check_extension(out: Path, fmt: str) -> None:
    holds = EXTENSIONS.get(out.suffix.lower())
    if holds is not None and holds != fmt:
        usual = ", ".join(e for e, f in EXTENSIONS.items() if f == fmt)
        raise ExportError(
            f"--out {str(out)!r}: the extension {out.suffix!r} says {holds}, but --format is "
            f"{fmt}; name the file {out.with_suffix(usual.split(', ')[0]).name} (or another of "
            f"{usual}), or pass the --format the name says"
        )


def preprocessing_spec(data_cfg: DataConfig, embedding_dim: int) -> dict[str, Any]:
    """What an image must go through before the exported model (``pipeline.serve.runtime`` reads it).

    The eval transform: decode to RGB, shorter side resized to ``data.resize_size`` (Pillow's
    antialiased bilinear, longer side truncated), centre crop ``data.image_size``, scale to
    [0, 1], ImageNet mean/std, NCHW float32.
    """
    side = data_cfg.image_size
    return {
        "format": SPEC_FORMAT,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "channel_order": "RGB",
        "input_size": [side, side],
        "resize_shorter_side": data_cfg.resize_size,
        "resize_rule": (
            "shorter side -> resize_shorter_side, longer side -> int(resize_shorter_side * "
            "long / short); skipped when the image already has that size; then centre crop "
            "input_size with top = round((h - crop_h) / 2), left = round((w - crop_w) / 2)"
        ),
        "interpolation": "bilinear (Pillow, antialiased)",
        "crop": "center",
        "scale": 1 / 255,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        # Optional speed-up the project uses when decoding (JPEG only); without it results
        # differ slightly for JPEGs more than twice this size.
        "jpeg_draft_min_side": draft_side(data_cfg, train=False),
        "embedding_dim": None if embedding_dim is None else int(embedding_dim),
        "l2_normalised": True,
        # The face crop the model takes (pipeline.data.faces): queries must be such crops, or
        # come with their five landmarks to be aligned the same way.
        "face_crop": crop_of(data_cfg),
    }


def _example(model: torch.nn.Module, data_cfg: DataConfig) -> torch.Tensor:
    side = data_cfg.image_size
    return torch.randn(_EXAMPLE_BATCH, 3, side, side, generator=torch.Generator().manual_seed(0))


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy in eval mode: the caller's model (e.g. on a GPU in bf16) is untouched."""
    return copy.deepcopy(model).float().cpu().eval()


def export_onnx(model: torch.nn.Module, data_cfg: DataConfig, out: str | Path) -> Path:
    """Write ``model`` (CPU, float32, eval mode) as ONNX with a dynamic batch dimension."""
    out = Path(out)
    model = _cpu_copy(model)
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (_example(model, data_cfg),),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))
    return out


def export_torchscript(model: torch.nn.Module, data_cfg: DataConfig, out: str | Path) -> Path:
    """Write ``model`` as a traced TorchScript module (any batch size; ``torch.jit.load``)."""
    out = Path(out)
    model = _cpu_copy(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, _example(model, data_cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(out))
    return out


def spec_path(out: str | Path) -> Path:
    """Where the preprocessing spec of the model file ``out`` goes: ``<stem>.preprocessing.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.preprocessing.json")


def export_model(
    model: Any,
    data_cfg: DataConfig,
    fmt: str,
    out: str | Path,
    *,
    force: bool = False,
    weights: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write the model in ``fmt`` to ``out`` and its preprocessing spec beside it, the spec
    naming the weights (``weights``, else :func:`pipeline.weights.model_weights_record`).

    Refuses (:class:`ExportError`) an unknown format and existing files unless ``force``.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_extension(out, fmt)
    spec_file = spec_path(out)
    if not force:
        for f in (out, spec_file):
            if f.exists():
                raise ExportError(
                    f"{f} exists; pipeline export does not overwrite files: pick another --out "
                    "or pass --force"
                )
    (export_onnx if fmt == "onnx" else export_torchscript)(model, data_cfg, out)
    spec = preprocessing_spec(data_cfg, model.head.out_features)
    spec["weights"] = weights or model_weights_record(model)
    spec_file.write_text(json.dumps(spec, indent=2) + "\n")
    return out, spec_file


# ---------------------------------------------------------------------------- MLflow


@dataclass
class LoggedModel:
    """Where :func:`log_mlflow_model` put the model."""

    run_id: str
    model_uri: str
    """``models:/<logged model id>``: the model as logged in the run."""
    registered_name: str | None
    version: int | None
    """The new version of ``registered_name`` (``models:/NAME/VERSION``), if registered."""


@contextlib.contextmanager
def _mlflow_uri(uri: str):
    """Point MLflow's fluent API at ``uri`` (tracking and registry) for the duration only.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` also export MLFLOW_TRACKING_URI /
    MLFLOW_REGISTRY_URI, and MLflow has no public way to go back to "unset"; so the module
    state and the two variables are put back as they were, and a caller's own MLflow setup
    (or an ``MlflowClient`` created later) is untouched.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {n: os.environ.get(n) for n in names}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for n, v in saved_env.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _example_image(side: int) -> bytes:
    """A small JPEG for the model's input example (a colour gradient)."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), -1)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _requirements() -> list[str]:
    """The serving model's packages, pinned to the versions here (no inference, no resolver)."""
    return [f"{p}=={version(p)}" for p in ("mlflow", "onnxruntime", "numpy", "pillow", "pandas")]


RUNTIME_PACKAGE = "smoothap_runtime"
"""The name the MLflow model's copy of the one image path goes by: MLflow puts the model's code
first on ``sys.path``, so a copy named ``pipeline`` would hide this project where both exist."""


def _decode_package(folder: Path) -> Path:
    """A copy of the modules of the one image path (``pipeline.data.image``, ``faces`` and
    ``errors``: NumPy and Pillow only) as the package :data:`RUNTIME_PACKAGE`, for the MLflow
    model to decode and crop exactly as make-shards without this project installed."""
    source = Path(pipeline.__file__).parent
    target = folder / RUNTIME_PACKAGE
    (target / "data").mkdir(parents=True)
    for rel in ("__init__.py", "errors.py", "data/__init__.py", "data/image.py", "data/faces.py"):
        text = (source / rel).read_text()
        (target / rel).write_text(text.replace("from pipeline.", f"from {RUNTIME_PACKAGE}."))
    return target


def log_mlflow_model(
    model: Any,
    data_cfg: DataConfig,
    *,
    tracking_uri: str,
    run_id: str,
    registered_model_name: str | None = None,
    name: str = "embedding_model",
    provenance: dict[str, str] | None = None,
) -> LoggedModel:
    """Log ``model`` into MLflow run ``run_id`` as a pyfunc model and register it.

    Input: a DataFrame with a column ``image`` of encoded image bytes (signature and input
    example included); output: float32 (N, D) L2-normalised embeddings, preprocessing inside.
    With ``registered_model_name`` each call adds a new version of that registered model.
    The model's metadata (``MLmodel``) and its spec name the weights; ``provenance``: what
    the caller knows beyond them (the training run's weights metadata: run id, step, config
    and catalog digests, code version). Only rank 0 calls this (the training loop: at the
    end, with the run's tracking URI).
    """
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    dim = int(model.head.out_features)
    known = dict(provenance or {})
    if "step" in known:
        known["step"] = int(known["step"])
    record = model_weights_record(model, {k: known.get(k) for k in ("run_id", "step")})
    metadata = {**known, **record}  # MLflow keeps it in the model's MLmodel file
    with tempfile.TemporaryDirectory(prefix="smoothap-mlflow-") as tmp:
        tmp = Path(tmp)
        onnx_file, spec_file = export_model(
            model, data_cfg, "onnx", tmp / "model.onnx", weights=record
        )
        # Models from code: the model is runtime.py plus the line that names its model
        # object; no pickled class, so loading needs neither this project nor torch.
        code = tmp / "embedding_model.py"
        code.write_text(
            RUNTIME_CODE.read_text() + "\n\nmlflow.models.set_model(EmbeddingPyfunc())\n"
        )
        decode_package = _decode_package(tmp / "code")
        signature = ModelSignature(
            inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim), "embedding")]),
        )
        example = pd.DataFrame({IMAGE_COLUMN: [_example_image(data_cfg.image_size)]})
        with _mlflow_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(code),
                artifacts={"onnx": str(onnx_file), "preprocessing": str(spec_file)},
                signature=signature,
                input_example=example,
                pip_requirements=_requirements(),
                code_paths=[str(decode_package)],
                registered_model_name=registered_model_name,
                metadata=metadata,
            )
    version = info.registered_model_version
    return LoggedModel(
        run_id=run_id,
        model_uri=info.model_uri,
        registered_name=registered_model_name,
        version=None if version is None else int(version),
    )


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        "config overrides (data.image_size, data.resize_size, tracking.uri, ...)",
    )
    parser.add_argument("--format", default=None, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument(
        "--out",
        default=None,
        help="model file to write; the spec goes to <stem>.preprocessing.json",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out and its spec")
    parser.add_argument(
        "--mlflow",
        action="store_true",
        help="log the model as an MLflow pyfunc model in a new run (tracking.* settings)",
    )
    parser.add_argument(
        "--register-model",
        default=None,
        metavar="NAME",
        help="with --mlflow: register it under NAME (a new version per call)",
    )


def load_weights_model(
    config: str | None, weights: str | None, tokens: list[str], eval_urls: str = ""
) -> tuple[Any, RunConfig, str]:
    """The trained model of ``--weights`` (``weights``), the config (its face crop from the
    weights, checked against the split ``eval_urls`` if given) and the weights' path (a
    checkpoint root resolved to the tag read, said on stderr).

    As in ``pipeline evaluate``: the file's recorded architecture is used unless the config
    names a model, in which case the two must agree (``ModelLoadError`` otherwise).
    """
    path, overrides = split_weights(weights, tokens)
    cfg = load_config(config, overrides)
    model = load_trained_model(path, named_model(config, overrides, cfg))
    origin = model.weights_origin
    if origin.resolved_from:  # a checkpoint root: this is the step read, whatever comes next
        print(origin.describe(), file=sys.stderr)
    # The face crop (and the input size it fixes) recorded with the weights.
    cfg = replace(cfg, data=crop_for_weights(cfg.data, origin.path, eval_urls))
    return model, cfg, origin.path


def run(args: argparse.Namespace) -> int:
    if args.register_model and not args.mlflow:
        raise ExportError("--register-model needs --mlflow (it names the MLflow registered model)")
    if (args.format is None) != (args.out is None):
        raise ExportError(
            "--format and --out go together: pass both, e.g. --format onnx --out m.onnx"
        )
    if not args.mlflow and (args.format is None or args.out is None):
        raise ExportError(
            "nothing to export to: pass --format onnx|torchscript and --out FILE, or --mlflow"
        )
    if args.format is not None and args.format not in FORMATS:
        raise ExportError(
            f"--format {args.format!r} is not supported; use one of {', '.join(FORMATS)}"
        )
    model, cfg, checkpoint = load_weights_model(args.config, args.weights, args.overrides)
    if args.format is not None:
        out, spec = export_model(model, cfg.data, args.format, args.out, force=args.force)
        print(f"wrote {out} ({args.format}, batch dynamic, {cfg.data.image_size} px) and {spec}")
    if args.mlflow:
        tracker = MlflowTracker(cfg.tracking)
        record = model_weights_record(model)
        tags = {"kind": "export", "checkpoint": checkpoint, IDENTITY_KEY: record[IDENTITY_KEY]}
        tracker.set_tags(tags | {f"weights_{k}": str(record[k]) for k in ("run_id", "step")})
        try:
            logged = log_mlflow_model(
                model,
                cfg.data,
                tracking_uri=tracker.uri,
                run_id=tracker.run_id,
                registered_model_name=args.register_model,
            )
        except BaseException:
            tracker.finish("FAILED")
            raise
        tracker.finish()
        print(f"MLflow run {logged.run_id}: logged {logged.model_uri}")
        if logged.registered_name:
            print(
                f"registered models:/{logged.registered_name}/{logged.version}; load it with "
                f"mlflow.pyfunc.load_model('models:/{logged.registered_name}/{logged.version}')"
            )
        print(ui_command(tracker.uri))
    return 0
