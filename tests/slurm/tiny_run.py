"""A tiny but real training setup shared by the launcher tests: synthetic shards written by
``pipeline make-shards``, a config that trains timm's ``test_resnet`` on 32 px images, and an
untrained weights file for evaluations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent.parent


def make_shards(out: Path) -> Path:
    """16 train and 8 test classes of 6 images (32 px), 24 samples a shard, under ``out``."""
    sizes = ["--classes", "16", "--test-classes", "8", "--images-per-class", "6"]
    shape = ["--image-size", "32", "--samples-per-shard", "24", "--workers", "1"]
    command = [sys.executable, "-m", "pipeline.cli", "make-shards", "synthetic"]
    subprocess.run(
        [*command, "--out", str(out), *sizes, *shape, "--no-progress"],
        check=True,
        capture_output=True,
        cwd=REPO,
        timeout=300,
    )
    return out


def tiny_config(path: Path, shards: Path, out: Path, *, steps: int, ckpt_every: int) -> Path:
    """A run that trains test_resnet on 32 px images for ``steps`` steps per epoch."""
    cfg = {
        "data": {
            "train": [{"name": "synthetic", "urls": str(shards / "train")}],
            "eval_urls": str(shards / "test"),
            "image_size": 32,
            "resize_size": 32,
            "num_workers": 0,
        },
        "sampler": {
            "classes_per_batch": 4,
            "samples_per_class": 2,
            "steps_per_epoch": steps,
            "shuffle_buffer_groups": 8,
        },
        "model": {"backbone": "test_resnet", "embedding_dim": 16},
        "optim": {"lr": 1e-3},
        "train": {
            "output_dir": str(out / "train"),
            "epochs": 1,
            "checkpoint_every": ckpt_every,
            "log_every": ckpt_every,
        },
        "eval": {"batch_size": 16, "ks": [1, 2]},
        "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "slurm-test"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def launcher_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """``python -m launch.slurm ARGS`` as a user runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "launch.slurm", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout_s,
    )


def random_weights(config: Path, path: Path) -> Path:
    """An untrained model of ``config`` saved as a run's weights file (evaluation input)."""
    import torch

    from pipeline.config_loader import load_config
    from pipeline.model import build_model, save_weights

    torch.manual_seed(0)
    model = build_model(load_config(config).model)
    return save_weights(model.state_dict(), model.architecture, path)
