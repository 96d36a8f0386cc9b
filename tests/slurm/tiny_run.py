"""A tiny but real training setup shared by the launcher tests: the sizes of their synthetic
shards, a config that trains timm's ``test_resnet`` on 32 px images, and an untrained weights
file for evaluations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.tiny import tiny_run_config, write_config

REPO = Path(__file__).resolve().parent.parent.parent

# The sizes of the ``synthetic_shards`` fixture (tests/conftest.py) these tests use: 16 train
# and 8 test classes of 6 images (32 px), 24 samples a shard.
SHARDS = dict(classes=16, test_classes=8, images_per_class=6, samples_per_shard=24)


def tiny_config(path: Path, shards: Path, out: Path, *, steps: int, ckpt_every: int) -> Path:
    """A run that trains test_resnet on 32 px images for ``steps`` steps per epoch."""
    cfg = tiny_run_config(
        shards,
        out / "train",
        sampler={"steps_per_epoch": steps, "shuffle_buffer_groups": 8},
        model={"backbone": "test_resnet"},
        optim={"lr": 1e-3},
        train={"epochs": 1, "checkpoint_every": ckpt_every, "log_every": ckpt_every},
        eval={"batch_size": 16, "ks": [1, 2]},
        tracking={"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "slurm-test"},
    )
    return write_config(path, cfg)


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

    from pipeline.config.load import load_config
    from pipeline.model import build_model
    from pipeline.weights import save_weights

    torch.manual_seed(0)
    model = build_model(load_config(config).model)
    return save_weights(model.state_dict(), model.architecture, path)
