"""Helpers for the data tests: tiny images and tiny shard sets made on the spot (no downloads)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config.schema import DataConfig, DatasetSource, SamplerConfig
from pipeline.data.synthetic import synthetic_items
from pipeline.data.writer import write_split


def jpeg_bytes(width: int = 24, height: int = 18, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A small noisy image encoded as ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, width: int = 24, height: int = 18, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".png": "PNG", ".bmp": "BMP"}.get(path.suffix.lower(), "JPEG")
    path.write_bytes(jpeg_bytes(width, height, seed, fmt))
    return path


def tiny_split(
    out: Path,
    split: str = "train",
    classes: int = 12,
    per_class: int = 6,
    samples_per_shard: int = 20,
    size: int = 16,
    seed: int = 0,
    name: str = "synthetic",
    per_class_sizes: list[int] | None = None,
) -> Path:
    """Write a small synthetic split and return its directory. ``per_class_sizes`` (one entry per
    class) makes uneven classes by dropping images."""
    items = synthetic_items(
        split=split,
        num_classes=classes,
        images_per_class=per_class if per_class_sizes is None else max(per_class_sizes),
        image_size=size,
        seed=seed,
        quality=90,
    )
    if per_class_sizes is not None:
        items = [
            it
            for it in items
            if it.meta["image_id"] < per_class_sizes[it.meta["class_id"] % 1_000_000]
        ]
    write_split(
        items,
        out,
        name=name,
        split=split,
        samples_per_shard=samples_per_shard,
        workers=1,
        seed=seed,
        progress=False,
    )
    return out / split


def cfgs(
    urls: str | list[str],
    *,
    p: int = 4,
    k: int = 3,
    steps: int = 10,
    workers: int = 0,
    streams: int = 0,
    buffer: int = 8,
    policy: str = "replace",
    seed: int = 0,
    weights: list[float] | None = None,
    image_size: int = 16,
) -> tuple[DataConfig, SamplerConfig]:
    """A (DataConfig, SamplerConfig) pair for tiny streams."""
    urls = [urls] if isinstance(urls, str) else urls
    weights = weights or [1.0] * len(urls)
    data = DataConfig(
        train=[
            DatasetSource(name=f"d{i}", urls=u, weight=w)
            for i, (u, w) in enumerate(zip(urls, weights))
        ],
        eval_urls=urls[0],
        image_size=image_size,
        resize_size=image_size,
        num_workers=workers,
    )
    sampler = SamplerConfig(
        classes_per_batch=p,
        samples_per_class=k,
        steps_per_epoch=steps,
        shuffle_buffer_groups=buffer,
        small_class_policy=policy,
        seed=seed,
        streams_per_rank=streams,
    )
    return data, sampler
