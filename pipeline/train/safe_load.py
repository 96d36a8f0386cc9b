"""Loading DeepSpeed checkpoint files without arbitrary unpickling.

DeepSpeed reads its files with ``torch.load(weights_only=False)``, which runs arbitrary pickled
code. :func:`safe_load` reads them with ``weights_only=True`` plus exactly three DeepSpeed
classes that ZeRO optimizer files contain (``LossScaler``, a plain record of the loss scale;
``fragment_address``, a dataclass of two ints; ``ZeroStageEnum``, an int enum); anything else
in a file is refused. Both the checkpoint engine (:mod:`pipeline.train.checkpoint`) and the
re-partitioning of a resume on another world size (:mod:`pipeline.train.elastic`) read through
it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _safe_globals() -> list:
    # The only non-container objects in DeepSpeed 0.19 checkpoints (ZeRO 1/2 optimizer
    # partitions); tests/test_checkpoint.py checks that a file with anything else is refused.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True`` and only DeepSpeed's three record classes."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)
