"""Reading and writing a model's weights: ``.safetensors`` files (with the architecture as
metadata), plain torch state dicts, and the model states file of a DeepSpeed checkpoint (its
weights and client state), which needs no DeepSpeed to read.

Identity: :func:`weights_sha256` hashes the tensors themselves (names, shapes, float32 bytes),
not a file, so the same weights carry the same identity in a checkpoint folder, a
``.safetensors`` file with any metadata, or an export; :class:`WeightsOrigin` is what every
artefact made from weights records about them (the identity, the file or checkpoint tag read,
and the run id and step where known).

Below the model: :mod:`pipeline.model` builds the network and fills it from here, and the
training checkpoints (:mod:`pipeline.train.checkpoint`) name their files through here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.errors import UserError

WEIGHTS_FORMAT = "smoothap-embedding-v1"
"""The ``format`` entry of a weights file's metadata."""

IDENTITY_KEY = "weights_sha256"
"""The metadata key (and record key) of the weights' identity (:func:`weights_sha256`)."""
PROVENANCE_KEYS = (
    IDENTITY_KEY,
    "run_id",
    "step",
    "config_sha256",
    "catalog_sha256",
    "code_version",
    "preprocessing",
)
"""What a trained weights file records about its origin, in its safetensors metadata (all
strings): the identity, the MLflow run id ('' when tracking was off), the optimizer step, the
SHA-256 of the run's resolved config, of its training catalogs, the code version and the
preprocessing scheme (``pipeline.data.transforms.weights_scheme``)."""
SHORT = 12
"""Hex digits of an identity shown in messages (the full one is stored)."""


def short(sha256: str | None) -> str:
    """The first :data:`SHORT` hex digits of an identity, or 'unknown'."""
    return sha256[:SHORT] if sha256 else "unknown"


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """The identity of a model's weights: SHA-256 over its tensors, whatever holds them.

    The tensors are taken as :func:`save_weights` writes them: a ``module.`` prefix removed,
    every tensor converted to float32 on the CPU (so a checkpoint's bf16 or int64 entries and
    the fp32 file written from it agree). In order of name (Python's string order), each
    tensor adds the line ``json.dumps([name, "float32", shape, byte count])`` and a newline,
    then its bytes (C order, little-endian). File format, metadata and tensor order in the
    file change nothing; one changed element changes it.
    """
    named = {k.removeprefix("module."): v for k, v in state.items()}
    if len(named) != len(state):
        raise ModelLoadError(
            "a state dict holds a tensor both with and without the 'module.' prefix; save "
            "the model's own state_dict() (one name per tensor)"
        )
    digest = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        data = np.ascontiguousarray(t.numpy(), dtype="<f4").reshape(-1).view(np.uint8)
        header = json.dumps([name, "float32", list(t.shape), int(data.size)])
        digest.update(header.encode() + b"\n")
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightsOrigin:
    """Which weights a model holds: what every artefact made from them records."""

    path: str
    """The file read, or the checkpoint tag folder (a checkpoint root is resolved to one tag)."""
    weights_sha256: str
    run_id: str | None = None
    """The training run's MLflow id ('' when tracking was off; None when not recorded)."""
    step: int | None = None
    """The optimizer step of the weights (None when not recorded)."""
    resolved_from: str | None = None
    """The checkpoint root given, when ``path`` is the tag its ``latest`` named then."""

    def record(self) -> dict[str, Any]:
        """The JSON-able record artefacts carry (path, identity, run id, step)."""
        return {
            "path": self.path,
            IDENTITY_KEY: self.weights_sha256,
            "run_id": self.run_id,
            "step": self.step,
        }

    def describe(self) -> str:
        """One line: ``weights: <root> -> step_... (weights sha256 ab12...)`` or the file."""
        given = (
            f"{self.resolved_from} -> {Path(self.path).name}" if self.resolved_from else self.path
        )
        step = "" if self.step is None else f", step {self.step}"
        return f"weights: {given} (weights sha256 {short(self.weights_sha256)}{step})"


def model_weights_record(model: torch.nn.Module, known: dict[str, Any] | None = None) -> dict:
    """The record of the weights ``model`` holds: the origin it was loaded from
    (``model.weights_origin``, set by ``pipeline.model.load_trained_model``) or, for a model
    in memory (training), its identity computed now; ``known`` adds what the caller knows
    (run id, step)."""
    origin = getattr(model, "weights_origin", None)
    if origin is not None:
        record = origin.record()
    else:
        record = {"path": None, IDENTITY_KEY: weights_sha256(model.state_dict())}
        record |= {"run_id": None, "step": None}
    return {**record, **{k: v for k, v in (known or {}).items() if v is not None}}


class ModelLoadError(UserError, ValueError):
    """Weights do not fit the model; the message names the file, the mismatch and the fix."""


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`ModelLoadError` naming the tensors of ``state`` that hold NaN or infinity:
    such weights embed every image as NaN, which would only show up as a meaningless metric."""
    bad = []
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            bad.append(f"{name}: {nan} NaN, {inf} inf")
    if bad:
        raise ModelLoadError(
            f"{what} holds NaN or infinite values in {len(bad)} tensors (e.g. "
            f"{'; '.join(bad[:3])}): the training diverged or the file is damaged; use the "
            "weights of an earlier checkpoint, or train again with a lower optim.lr"
        )


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


def save_weights(
    state: dict[str, torch.Tensor],
    architecture: dict,
    path: str | Path,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a model's state dict as fp32 ``.safetensors``, with ``architecture``
    (``EmbeddingModel.architecture``), the weights' identity (:func:`weights_sha256`, always)
    and ``metadata`` (strings: the provenance of :data:`PROVENANCE_KEYS` the caller knows)
    as metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    meta = {
        **(metadata or {}),
        IDENTITY_KEY: weights_sha256(state),
        "format": WEIGHTS_FORMAT,
        "architecture": json.dumps(architecture),
    }
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # a reader never sees half a file
    return path


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


def resolve_checkpoint(path: str | Path) -> tuple[Path, str | None]:
    """A DeepSpeed checkpoint directory as one tag folder, read once: a tag folder is itself
    (and None), a root is the tag its ``latest`` names now (and the root). A run that goes
    on moves ``latest``; whoever reads the tag folder returned here reads one fixed step."""
    path = Path(path)
    if (path / MODEL_STATES).is_file():
        return path, None
    tag = latest_tag(path)
    if tag is None:
        raise ModelLoadError(
            f"{str(path)!r} is a directory but neither a DeepSpeed checkpoint tag (no "
            f"{MODEL_STATES}) nor a checkpoint root (no 'latest' file); pass the run's "
            "model.safetensors or its checkpoints/ directory"
        )
    if not (path / tag / MODEL_STATES).is_file():
        raise ModelLoadError(
            f"{path / tag} (named by {path / LATEST}) holds no {MODEL_STATES}; pass another "
            "checkpoint tag folder of the run, or its model.safetensors"
        )
    return path / tag, str(path)


def resolve_weights_path(path: str | Path) -> tuple[str, str | None]:
    """The weights to read for ``path`` and the checkpoint root it was resolved from (None
    for a file or a tag folder): a job whose ranks each read the weights resolves once, on
    one rank, and gives every rank the tag, so that all of them embed with one step."""
    if not Path(path).is_dir():
        return str(path), None
    tag, root = resolve_checkpoint(path)
    return str(tag), root


def _recorded_step(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def read_trained_weights(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict | None, Path, WeightsOrigin]:
    """The state dict, recorded architecture (None when the file records none), file and
    origin of trained weights: a ``.safetensors`` file written by :func:`save_weights` (a
    run's ``model.safetensors``), or a DeepSpeed checkpoint directory (a root is resolved
    once to the tag its ``latest`` names, :func:`resolve_checkpoint`). The origin's identity
    is computed from the tensors read, whatever the file says."""
    path = Path(path)
    if path.is_dir():
        tag, root = resolve_checkpoint(path)
        file = tag / MODEL_STATES
        states = torch.load(file, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in states["module"].items()}
        run_id = states.get("mlflow_run_id")
        origin = WeightsOrigin(
            str(tag), weights_sha256(state), run_id, _recorded_step(states.get("step")), root
        )
        # The training loop's client state records the architecture beside the module.
        return state, states.get("architecture"), file, origin
    state, meta = read_state_dict(path)
    arch = json.loads(meta["architecture"]) if "architecture" in meta else None
    origin = WeightsOrigin(
        str(path), weights_sha256(state), meta.get("run_id"), _recorded_step(meta.get("step"))
    )
    return state, arch, path, origin


def read_metadata(path: str | Path) -> dict[str, str]:
    """A ``.safetensors`` file's metadata, without reading its tensors ({} for a file that
    has none); ModelLoadError for a file that is not one."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # SafetensorError (a Rust exception) on a broken file
        raise ModelLoadError(
            f"cannot read {str(path)!r} as a .safetensors file ({type(e).__name__}); the "
            "file is damaged or not a safetensors file"
        ) from e
