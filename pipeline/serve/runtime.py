"""A trained embedding model outside the project: preprocessing from its JSON spec, then the
ONNX graph, with NumPy, Pillow and onnxruntime only (no torch; from ``pipeline`` only the one
image path, ``pipeline.data.image`` and ``faces``, which the MLflow model carries as code).

``pipeline export`` writes the spec (:data:`SPEC_KEYS`) beside every exported model, and this
file is the reference implementation of it: the eval transform of ``pipeline.data.transforms``
(decode -> RGB, shorter side resized to ``resize_shorter_side`` with Pillow's antialiased
bilinear filter, centre crop to ``input_size``, /255, minus ``mean``, over ``std``, NCHW float32).

This file is also the code of the MLflow pyfunc model (MLflow's "models from code":
``pipeline.serve.export.log_mlflow_model`` copies it into the model and appends the ``set_model``
call), which is why it must stay self-contained.

Shape legend: N images, H x W pixels, S crop side, D embedding dimension.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from PIL import Image

try:
    from pipeline.data import image as one_path
except ImportError:  # the MLflow model without this project: its copy (pipeline.export)
    from smoothap_runtime.data import image as one_path  # type: ignore[no-redef]

SPEC_FORMAT = "smoothap-preprocessing-v1"
SPEC_KEYS = (
    "format",
    "input_name",
    "output_name",
    "layout",
    "dtype",
    "channel_order",
    "input_size",
    "resize_shorter_side",
    "resize_rule",
    "interpolation",
    "crop",
    "scale",
    "mean",
    "std",
    "jpeg_draft_min_side",
    "embedding_dim",
    "l2_normalised",
    "face_crop",
)
log = logging.getLogger("smoothap.serving")

IMAGE_COLUMN = "image"
"""The pyfunc model's input: a DataFrame column of encoded image bytes."""
LANDMARKS_COLUMN = "landmarks"
"""Optional: each image's five landmarks (x1, y1, ..., x5, y5) for an aligned-face model."""


def read_spec(path: str | Path) -> dict[str, Any]:
    """The preprocessing spec written beside an exported model (checks its format)."""
    spec = json.loads(Path(path).read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(
            f"{path}: format {spec.get('format')!r} is not {SPEC_FORMAT!r}; "
            "export the model again with `pipeline export`"
        )
    return spec


def decode(data: bytes, spec: dict[str, Any]) -> Image.Image:
    """Encoded image bytes -> RGB image: ``pipeline.data.image.decode`` (the mode rules of
    make-shards) with ``min_side = jpeg_draft_min_side``."""
    return one_path.decode(data, int(spec["jpeg_draft_min_side"]))


def preprocess(image: Image.Image | np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """One RGB image (PIL, or HxWx3 uint8 array) -> float32 (3, S, S), as the spec says."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image array of shape {image.shape} and dtype {image.dtype}: "
                "expected H x W x 3 uint8 (RGB)"
            )
        image = Image.fromarray(image, "RGB")
    return one_path.eval_array(image, spec)


def to_array(item: Any, spec: dict[str, Any], landmarks: Any = None) -> np.ndarray:
    """Encoded bytes (with their five landmarks for an aligned-face model, or already a crop of
    the model's kind) or an HxWx3 uint8 array -> float32 (3, S, S)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return one_path.model_input(bytes(item), spec, landmarks=landmarks)
    if isinstance(item, np.ndarray):
        return preprocess(item, spec)
    raise TypeError(
        f"an image must be encoded bytes or an H x W x 3 uint8 array, not {type(item).__name__}"
    )


class OnnxEmbedder:
    """An exported ONNX model and its spec: images in, L2-normalised embeddings out."""

    def __init__(self, onnx_path: str | Path, spec: dict[str, Any], threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (all cores)
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.spec = spec

    def embed_batch(self, images_NCHW: np.ndarray) -> np.ndarray:
        """Preprocessed float32 (N, 3, S, S) -> float32 (N, D)."""
        inputs = {self.spec["input_name"]: np.ascontiguousarray(images_NCHW, np.float32)}
        return self.session.run([self.spec["output_name"]], inputs)[0]

    def embed(
        self, images: list[Any], batch_size: int = 64, landmarks: list[Any] | None = None
    ) -> np.ndarray:
        """Encoded image bytes and/or HxWx3 uint8 arrays -> float32 (N, D); ``landmarks``:
        each image's ten landmark numbers (or None) for an aligned-face model."""
        marks = list(landmarks) if landmarks is not None else [None] * len(images)
        out = [np.zeros((0, int(self.spec["embedding_dim"])), np.float32)]
        for start in range(0, len(images), batch_size):
            chunk = zip(images[start : start + batch_size], marks[start : start + batch_size])
            batch = [to_array(x, self.spec, m) for x, m in chunk]
            out.append(self.embed_batch(np.stack(batch)))
        return np.concatenate(out)

    def embed_rows(self, images: list[Any], batch_size: int = 64) -> np.ndarray:
        """Like :meth:`embed`, but a row that is not an image is logged with its position and
        reason and comes back as a row of NaN; the other rows are embedded."""
        arrays, bad = [], []
        for row, item in enumerate(images):
            try:
                arrays.append(to_array(item, self.spec))
            except Exception as e:  # any decode failure: Pillow raises many kinds
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                bad.append(row)
                log.warning("row %d is not an image (%s): its embedding is NaN", row, reason)
        out = np.full((len(images), int(self.spec["embedding_dim"])), np.nan, np.float32)
        keep = np.setdiff1d(np.arange(len(images)), bad)
        for start in range(0, len(arrays), batch_size):
            batch = np.stack(arrays[start : start + batch_size])
            out[keep[start : start + batch_size]] = self.embed_batch(batch)
        return out


class EmbeddingPyfunc(mlflow.pyfunc.PythonModel):
    """The MLflow pyfunc model: a DataFrame with an ``image`` column of encoded image bytes
    (a list of bytes or of HxWx3 uint8 arrays also works outside schema enforcement) ->
    float32 (N, D) L2-normalised embeddings; a row that is not an image is logged with its
    position and comes back as NaN. Artifacts: ``onnx`` and ``preprocessing``."""

    # No type hints on these two: MLflow would read them as the model's input schema.
    def load_context(self, context):
        spec = read_spec(context.artifacts["preprocessing"])
        self.embedder = OnnxEmbedder(context.artifacts["onnx"], spec)

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "columns"):  # a pandas DataFrame
            if IMAGE_COLUMN not in model_input.columns:
                raise ValueError(
                    f"input columns {list(model_input.columns)}: need a column "
                    f"{IMAGE_COLUMN!r} of encoded image bytes"
                )
            images = list(model_input[IMAGE_COLUMN])
            if LANDMARKS_COLUMN in model_input.columns:
                return self.embedder.embed(images, landmarks=list(model_input[LANDMARKS_COLUMN]))
        else:
            images = list(model_input)
        # One unreadable upload must not fail the whole request: it is named, the rest embedded.
        return self.embedder.embed_rows(images)
