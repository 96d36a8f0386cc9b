"""The tiny setup the training, evaluation and launcher tests share: timm's ``test_byobnet`` as
the model, synthetic shards written by the real ``pipeline make-shards synthetic``, and a run
config at 32 px around them.

Plain functions, so that code run in spawned processes (tests/dist_helpers.py, the cluster
probes) and module-level constants use them too; tests/conftest.py wraps the shards as
session fixtures written once.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from pipeline.config.schema_train import ModelConfig

TINY_BACKBONE = "test_byobnet"  # timm's smallest BatchNorm network: 256 pooled features
IMAGE_SIZE = 32


def tiny_model_config(embedding_dim: int = 16, **fields) -> ModelConfig:
    """The tiny model spec; ``fields`` are further ``ModelConfig`` fields (``freeze_bn``...)."""
    return ModelConfig(backbone=TINY_BACKBONE, embedding_dim=embedding_dim, **fields)


def make_synthetic_shards(
    out: Path,
    *,
    classes: int,
    test_classes: int,
    images_per_class: int,
    samples_per_shard: int,
    image_size: int = IMAGE_SIZE,
) -> Path:
    """``pipeline make-shards synthetic`` (in this process) into ``out``: ``out/train`` and
    ``out/test``. Returns ``out``."""
    from pipeline.cli import main

    args = ["make-shards", "synthetic", "--out", str(out), "--workers", "1", "--no-progress"]
    args += ["--classes", str(classes), "--test-classes", str(test_classes)]
    args += ["--images-per-class", str(images_per_class), "--image-size", str(image_size)]
    args += ["--samples-per-shard", str(samples_per_shard)]
    assert main(args) == 0, f"make-shards failed: {args}"
    return out


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def tiny_run_config(shards: Path, output_dir: Path, **sections: dict) -> dict:
    """A run config (the YAML's dict): the tiny model on ``shards/train`` at 32 px, evaluated
    on ``shards/test``, batches of 4 classes x 2 images, frozen BatchNorm, into ``output_dir``. Each keyword is a
    section deep-merged over this, e.g. ``sampler={"steps_per_epoch": 8}``."""
    cfg = {
        "data": {
            "train": [{"name": "synthetic", "urls": str(shards / "train")}],
            "eval_urls": str(shards / "test"),
            "image_size": IMAGE_SIZE,
            "resize_size": IMAGE_SIZE,
            "num_workers": 0,
        },
        "sampler": {"classes_per_batch": 4, "samples_per_class": 2},
        "model": {"backbone": TINY_BACKBONE, "embedding_dim": 16, "freeze_bn": True},
        "train": {"output_dir": str(output_dir)},
    }
    return _merge(cfg, sections)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
