"""A trained embedding model outside the project: preprocessing from its JSON spec, then the
ONNX graph, with NumPy, Pillow and onnxruntime only (no torch, nothing from ``pipeline``).

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

import io
import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from PIL import Image

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
)
IMAGE_COLUMN = "image"
"""The pyfunc model's input: a DataFrame column of encoded image bytes."""


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
    """Encoded image bytes -> RGB image, as ``pipeline.data.transforms.decode_image`` does with
    ``min_side = jpeg_draft_min_side`` (libjpeg may decode a large JPEG at 1/2, 1/4, 1/8 scale
    as long as its shorter side stays >= that)."""
    image = Image.open(io.BytesIO(data))
    min_side = int(spec["jpeg_draft_min_side"])
    if min_side > 0 and image.format == "JPEG":
        w, h = image.size
        scale = min_side / min(w, h)
        if scale < 0.5:
            image.draft("RGB", (int(w * scale) + 1, int(h * scale) + 1))
    return image.convert("RGB")


def preprocess(image: Image.Image | np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """One RGB image (PIL, or HxWx3 uint8 array) -> float32 (3, S, S), as the spec says."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image array of shape {image.shape} and dtype {image.dtype}: "
                "expected H x W x 3 uint8 (RGB)"
            )
        image = Image.fromarray(image, "RGB")
    side = int(spec["resize_shorter_side"])
    w, h = image.size
    # torchvision's rule for Resize(int): the shorter side becomes `side`, the longer one
    # int(side * long / short) (truncated), and an image already that size is left alone.
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = side, int(side * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=Image.BILINEAR)
    crop_h, crop_w = (int(v) for v in spec["input_size"])
    top = round((new_h - crop_h) / 2.0)
    left = round((new_w - crop_w) / 2.0)
    image = image.crop((left, top, left + crop_w, top + crop_h))
    pixels_HWC = np.asarray(image, dtype=np.float32) * np.float32(spec["scale"])
    mean = np.asarray(spec["mean"], np.float32)
    std = np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(((pixels_HWC - mean) / std).transpose(2, 0, 1))


def to_array(item: Any, spec: dict[str, Any]) -> np.ndarray:
    """Encoded bytes or an HxWx3 uint8 array -> float32 (3, S, S)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return preprocess(decode(bytes(item), spec), spec)
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

    def embed(self, images: list[Any], batch_size: int = 64) -> np.ndarray:
        """Encoded image bytes and/or HxWx3 uint8 arrays -> float32 (N, D)."""
        out = [np.zeros((0, int(self.spec["embedding_dim"])), np.float32)]
        for start in range(0, len(images), batch_size):
            batch = [to_array(x, self.spec) for x in images[start : start + batch_size]]
            out.append(self.embed_batch(np.stack(batch)))
        return np.concatenate(out)


class EmbeddingPyfunc(mlflow.pyfunc.PythonModel):
    """The MLflow pyfunc model: a DataFrame with an ``image`` column of encoded image bytes
    (a list of bytes or of HxWx3 uint8 arrays also works outside schema enforcement) ->
    float32 (N, D) L2-normalised embeddings. Artifacts: ``onnx`` and ``preprocessing``."""

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
        else:
            images = list(model_input)
        return self.embedder.embed(images)
