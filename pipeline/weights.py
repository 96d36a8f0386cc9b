"""Reading and writing a model's weights: ``.safetensors`` files (with the architecture as
metadata), plain torch state dicts, and the model states file of a DeepSpeed checkpoint (its
weights and client state), which needs no DeepSpeed to read.

Below the model: :mod:`pipeline.model` builds the network and fills it from here, and the
training checkpoints (:mod:`pipeline.train.checkpoint`) name their files through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.errors import UserError

WEIGHTS_FORMAT = "smoothap-embedding-v1"


"""The ``format`` entry of a weights file's metadata."""


class ModelLoadError(UserError, ValueError):
    """Weights do not fit the model; the message names the file, the mismatch and the fix."""


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file, or the state dict of a torch file.

    Torch files are read with ``weights_only=True`` (tensors and plain containers only); a
    nested ``state_dict``/``model``/``module`` entry is unwrapped and a ``module.`` prefix
    (DataParallel) removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = f.keys()  # a safe_open handle is not iterable
                return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
        except Exception as e:  # SafetensorError (a Rust exception) on a broken file
            raise ModelLoadError(
                f"cannot read {str(path)!r} as a .safetensors file ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'no detail'}); the file is damaged or "
                "not a safetensors file: re-copy it, or point to a run's model.safetensors "
                "(written by `pipeline train`)"
            ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"cannot read {str(path)!r} as a weights file with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); save a plain state dict "
            "(torch.save(model.state_dict(), f)) or a .safetensors file"
        ) from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{str(path)!r} holds no state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def save_weights(state: dict[str, torch.Tensor], architecture: dict, path: str | Path) -> Path:
    """Write a model's state dict as fp32 ``.safetensors``, with ``architecture``
    (``EmbeddingModel.architecture``) as metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    meta = {"format": WEIGHTS_FORMAT, "architecture": json.dumps(architecture)}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # a reader never sees half a file
    return path


def _checkpoint_model_file(path: Path) -> Path:
    """The model states file of a DeepSpeed checkpoint directory (root or tag)."""
    file = model_states_file(path)
    if file is None:
        raise ModelLoadError(
            f"{str(path)!r} is a directory but neither a DeepSpeed checkpoint tag (no "
            f"{MODEL_STATES}) nor a checkpoint root (no 'latest' file); pass the run's "
            "model.safetensors or its checkpoints/ directory"
        )
    return file


LATEST = "latest"


# The model states file of a DeepSpeed checkpoint tag (ZeRO 0-2): the module's full state
# dict and the client state.
MODEL_STATES = "mp_rank_00_model_states.pt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be resumed from; the message names it and the fix."""


def latest_tag(root: str | Path) -> str | None:
    """The tag ``latest`` names, or None when nothing was saved yet: the one reader of
    ``latest``."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (Path(root) / tag).is_dir():
        raise CheckpointError(
            f"{path} names checkpoint {tag!r}, which does not exist under {root}; restore "
            f"it, or point {path} at one of {sorted(p.name for p in Path(root).glob('step_*'))}"
        )
    return tag


def model_states_file(path: str | Path) -> Path | None:
    """The model states file of a checkpoint tag directory, or of the tag ``latest`` names
    in a checkpoint root; None when ``path`` is neither."""
    path = Path(path)
    if (path / MODEL_STATES).is_file():
        return path / MODEL_STATES
    tag = latest_tag(path)
    return None if tag is None else path / tag / MODEL_STATES


def read_client_state(file: str | Path) -> dict[str, Any]:
    """The entries of a model states file other than the weights (no DeepSpeed needed)."""
    # mmap: the module's tensors are mapped, not read; only the small entries are.
    states = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return {k: v for k, v in states.items() if k != "module"}


def read_trained_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, Path]:
    """The state dict, recorded architecture (None when the file records none) and file of
    trained weights: a ``.safetensors`` file written by :func:`save_weights` (a run's
    ``model.safetensors``), or a DeepSpeed checkpoint directory (root or tag) of a run."""
    path = Path(path)
    if path.is_dir():
        file = _checkpoint_model_file(path)
        states = torch.load(file, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in states["module"].items()}
        # The training loop's client state records the architecture beside the module.
        return state, states.get("architecture"), file
    state, meta = read_state_dict(path)
    arch = json.loads(meta["architecture"]) if "architecture" in meta else None
    return state, arch, path
