"""The torchvision v2 train / eval transforms (sizes and face crop from ``DataConfig``), the
crop-mode rules of a run, and the preprocessing scheme that travels with trained weights.

Images are decoded by ``pipeline.data.image.decode`` (the one decode path). Loose crops and
whole images: RandomResizedCrop + flip in training, resize + centre crop in evaluation. Aligned
face crops are already the network's input: horizontal flip only in training, nothing in
evaluation (the resize and centre crop to the crop's own size change nothing on a crop of that
size, and fit any other image the same way the evaluation of whole images does).

Both transforms take a PIL RGB image and return a float32 (3, S, S) tensor, ImageNet-normalised.
Geometry runs on the PIL image (crop before converting: fewer pixels to convert and normalise).
``train_transform`` draws from torch's global generator; the train stream uses
``TrainAugment`` instead, which draws from a generator per sample (seeded by the sample's
position), so that samples may be transformed on several threads reproducibly.
``normalise_batch`` also takes a uint8 batch tensor, e.g. to normalise on the GPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.config.schema import DataConfig
from pipeline.data import faces
from pipeline.data.image import decode

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalise() -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_geometry(data_cfg: DataConfig) -> v2.Compose:
    """The random part of ``train_transform``: PIL image -> uint8 (3, S, S) tensor."""
    if data_cfg.crop == "aligned":
        return v2.Compose([*_fit(data_cfg.image_size), v2.RandomHorizontalFlip(), v2.ToImage()])
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                data_cfg.image_size, scale=(data_cfg.crop_scale_min, 1.0), antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
        ]
    )


class TrainAugment:
    """The training augmentation with its random draws taken from a generator the caller
    passes, not from torch's global one: PIL image, ``np.random.Generator`` -> uint8 (3, S, S).

    Whole images and loose crops: a random resized crop (area fraction uniform in
    [crop_scale_min, 1], log aspect ratio uniform in [log 3/4, log 4/3], up to 10 tries, then
    the largest centred crop of a clamped aspect ratio, as torchvision's RandomResizedCrop
    draws it) resized to S, then a horizontal flip with probability 1/2. Aligned faces: fitted
    to S (identity on an S x S crop), then the flip. Each sample can thus own a generator
    seeded by its position in the stream, so samples may be transformed in any order, on any
    thread, with the same result.
    """

    RATIO = (3 / 4, 4 / 3)

    def __init__(self, data_cfg: DataConfig):
        self.size = data_cfg.image_size
        self.aligned = data_cfg.crop == "aligned"
        self.scale = (data_cfg.crop_scale_min, 1.0)

    def crop_box(self, width: int, height: int, rng) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, drawn from ``rng``."""
        area = width * height
        log_ratio = (math.log(self.RATIO[0]), math.log(self.RATIO[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        ratio = width / height
        if ratio < self.RATIO[0]:
            w, h = width, round(width / self.RATIO[0])
        elif ratio > self.RATIO[1]:
            w, h = round(height * self.RATIO[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, rng) -> torch.Tensor:
        side = [self.size, self.size]
        if self.aligned:
            image = F.center_crop(F.resize(image, self.size, antialias=True), side)
        else:
            top, left, h, w = self.crop_box(image.width, image.height, rng)
            image = F.resized_crop(image, top, left, h, w, side, antialias=True)
        if rng.random() < 0.5:
            image = F.horizontal_flip(image)
        return F.pil_to_tensor(image)


def _fit(side: int) -> list:
    """Identity on a side x side image; anything else resized and centre-cropped to it."""
    return [v2.Resize(side, antialias=True), v2.CenterCrop(side)]


def eval_geometry(data_cfg: DataConfig) -> v2.Compose:
    """``eval_transform`` before normalisation: PIL image -> uint8 (3, S, S) tensor."""
    if data_cfg.crop == "aligned":
        return v2.Compose([*_fit(data_cfg.image_size), v2.ToImage()])
    return v2.Compose(
        [
            v2.Resize(data_cfg.resize_size, antialias=True),
            v2.CenterCrop(data_cfg.image_size),
            v2.ToImage(),
        ]
    )


def train_transform(data_cfg: DataConfig) -> v2.Compose:
    """RandomResizedCrop(image_size, scale=(crop_scale_min, 1)) + horizontal flip + normalise:
    PIL image -> float32 (3, S, S)."""
    return v2.Compose([*train_geometry(data_cfg).transforms, *_normalise()])


def eval_transform(data_cfg: DataConfig) -> v2.Compose:
    """Resize (shorter side to resize_size) + CenterCrop(image_size) + normalise:
    PIL image -> float32 (3, S, S)."""
    return v2.Compose([*eval_geometry(data_cfg).transforms, *_normalise()])


_SCALE = 1 / (255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
_SHIFT = -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalise_batch(images_uint8: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """uint8 images, (B, 3, S, S) or a list of (3, S, S), as float32 (B, 3, S, S), ImageNet-
    normalised.

    Equals stacking the per-image ``ToDtype + Normalize`` of the transforms above to within
    float32 rounding (~1e-6), in one multiply-add over the batch instead of four passes per
    image (a quarter of the per-image transform time on 224 px crops).
    """
    if isinstance(images_uint8, list):
        images_uint8 = torch.stack(images_uint8)
    device = images_uint8.device  # on a GPU, normalise there (a 4x smaller host copy)
    return images_uint8.to(torch.float32).mul_(_SCALE.to(device)).add_(_SHIFT.to(device))


_SCALE_NP = _SCALE[0].numpy()
_SHIFT_NP = _SHIFT[0].numpy()


def normalise_into(out: torch.Tensor, image_uint8: torch.Tensor) -> None:
    """Write one uint8 (3, S, S) image into ``out``, a float32 (3, S, S) CPU view (e.g. a row
    of a batch), normalised exactly as ``normalise_batch`` does it: the same two elementwise
    float32 operations (uint8 -> float32 is exact), so bitwise the same values.

    In numpy, which runs them on the calling thread with the GIL released: torch would split
    each into its intra-op thread pool, and several decoding threads doing so at once
    oversubscribe the cores (spinning OpenMP threads burn the CPU the decoders need)."""
    o = out.numpy()
    np.multiply(image_uint8.numpy(), _SCALE_NP, out=o)
    np.add(o, _SHIFT_NP, out=o)


def decode_image(data: bytes, min_side: int = 0) -> Image.Image:
    """Image bytes -> RGB PIL image: ``pipeline.data.image.decode`` (the one decode path)."""
    return decode(data, min_side)


def draft_side(data_cfg: DataConfig, train: bool) -> int:
    """The smallest shorter side a decoded image may have without losing input resolution.

    Train: RandomResizedCrop may take a crop of area crop_scale_min with aspect ratio 3/4 (its
    short side is sqrt(crop_scale_min * 3/4) of the image's) and resize it to image_size.
    Eval: the image is resized to resize_size anyway.
    """
    if data_cfg.crop == "aligned":
        return data_cfg.image_size
    if train:
        return int(data_cfg.image_size / (data_cfg.crop_scale_min * 0.75) ** 0.5) + 1
    return data_cfg.resize_size


# ---------------------------------------------------------------------------- crop rules


def crop_of(data_cfg: DataConfig) -> dict[str, Any]:
    """The crop record of a resolved data config (``resolve_crop``)."""
    if data_cfg.crop in ("auto", "none"):
        return dict(faces.NO_CROP)
    return faces.crop_record(data_cfg.crop, data_cfg.crop_size)


def _model_side(
    data_cfg: DataConfig,
    train: bool,
    weights_crop: dict | None,
    weights_name: str,
    eval_urls: str,
) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(what the model takes, what it is evaluated on): named crop records that are known."""
    model: list[tuple[str, dict]] = []
    if train:
        for i, src in enumerate(data_cfg.train):
            rec = faces.split_crop(src.urls)
            if rec is not None:
                model.append((f"data.train[{i}].urls={src.urls}", rec))
    elif weights_crop is not None:
        model.append((f"the weights {weights_name}", weights_crop))
    if data_cfg.crop != "auto":
        model.append((f"data.crop={data_cfg.crop}", crop_of(data_cfg)))
    rec = faces.split_crop(eval_urls) if eval_urls else None
    name = f"data.eval_urls={eval_urls}" if eval_urls == data_cfg.eval_urls else eval_urls
    evaluated = [(name, rec)] if rec is not None else []
    return model, evaluated


def _same(a: dict, b: dict) -> bool:
    if a.get("mode") != b.get("mode"):
        return False
    return a.get("mode") == "none" or int(a.get("size", 0)) == int(b.get("size", 0))


def _check_training_mix(model: list[tuple[str, dict]]) -> None:
    """Loose faces and whole images share their transforms and may be mixed (faces with
    species); aligned crops are the network's input as they are and mix with nothing else."""
    for name, rec in model[1:]:
        first_name, first = model[0]
        if not _same(rec, first) and "aligned" in (rec.get("mode"), first.get("mode")):
            raise faces.CropError(
                f"{first_name} holds {faces.describe(first)} faces but {name} "
                f"{faces.describe(rec)}: aligned crops are the network's input as they are and "
                "mix with no other crop; make the shards again with the same make-shards --crop"
            )


def resolve_crop(
    data_cfg: DataConfig,
    *,
    train: bool,
    weights_crop: dict | None = None,
    weights_name: str = "",
    eval_urls: str | None = None,
) -> DataConfig:
    """``data_cfg`` with ``crop`` / ``crop_size`` set from what the run reads: the training
    splits' catalogs (``train``) or the weights' recorded crop (``weights_crop``), and the
    evaluation split's. A model is never silently evaluated on another crop mode: a mismatch
    is a one-line ``faces.CropError`` unless ``data.allow_crop_mismatch=true`` (then a warning,
    and the evaluation split is read as it is stored). ``eval_urls``: the split evaluated
    (default ``data.eval_urls``; "" for none)."""
    eval_urls = data_cfg.eval_urls if eval_urls is None else eval_urls
    model, evaluated = _model_side(data_cfg, train, weights_crop, weights_name, eval_urls)
    _check_training_mix(model)
    chosen = model[0][1] if model else (evaluated[0][1] if evaluated else dict(faces.NO_CROP))
    if evaluated and any(_same(evaluated[0][1], rec) for _, rec in model):
        chosen = evaluated[0][1]  # a mix of loose faces and whole images: the evaluated one
    elif evaluated and model:
        message = (
            f"{model[0][0]}: a model of {faces.describe(chosen)} faces, evaluated on "
            f"{evaluated[0][0]} of {faces.describe(evaluated[0][1])} faces"
        )
        if not data_cfg.allow_crop_mismatch:
            raise faces.CropError(
                f"{message}: the numbers would not compare with any published one; make the "
                "evaluation shards with the model's make-shards --crop, or set "
                "data.allow_crop_mismatch=true to evaluate anyway"
            )
        log.warning("%s (data.allow_crop_mismatch=true)", message)
        if not train:
            chosen = evaluated[0][1]
    mode, size = chosen.get("mode", "none"), int(chosen.get("size", 0))
    resolved = dataclasses.replace(data_cfg, crop=mode, crop_size=size)
    if mode == "aligned":
        if data_cfg.image_size != size:
            source = next((n for n, r in [*model, *evaluated] if r is chosen), "the shards")
            raise faces.CropError(
                f"data.image_size={data_cfg.image_size} but {source} holds aligned "
                f"{size}x{size} faces, which are the network's input as they are; set "
                f"data.image_size={size}"
            )
        resolved = dataclasses.replace(resolved, resize_size=size)
    return resolved


def crop_for_weights(
    data_cfg: DataConfig, weights: str | Path, eval_urls: str | None = None
) -> DataConfig:
    """:func:`resolve_crop` for evaluating the weights file ``weights`` (its recorded scheme)."""
    scheme = read_weights_scheme(weights)
    return resolve_crop(
        data_cfg,
        train=False,
        weights_crop=scheme["crop"] if scheme else None,
        weights_name=str(weights),
        eval_urls=eval_urls,
    )


# ---------------------------------------------------------------------------- weights scheme

SCHEME_KEY = "preprocessing"
"""The safetensors metadata key of the weights' preprocessing scheme (a JSON string)."""


def weights_scheme(data_cfg: DataConfig) -> dict[str, Any]:
    """What an image must go through before these weights (JSON-able; written into the
    weights' safetensors metadata under :data:`SCHEME_KEY`)::

        {"crop": {"mode": "none" | "loose" | "aligned", "size": int, ...its parameters},
         "input_size": S, "resize_shorter_side": R, "mean": [3 floats], "std": [3 floats]}
    """
    return {
        "crop": crop_of(data_cfg),
        "input_size": data_cfg.image_size,
        "resize_shorter_side": data_cfg.resize_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


def read_weights_scheme(path: str | Path) -> dict[str, Any] | None:
    """The scheme recorded in a ``.safetensors`` weights file; None for a file without one
    (older weights, DeepSpeed checkpoint directories, torch files)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(SCHEME_KEY)
    except Exception:  # unreadable files are reported by the weights loader itself
        return None
    return json.loads(raw) if raw else None
