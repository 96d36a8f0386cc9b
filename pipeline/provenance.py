"""Where a training run's weights come from, as strings for their safetensors metadata.

:func:`training_provenance` is what the run's final export writes beside the weights (the
identity itself is computed by :func:`pipeline.weights.save_weights`): the MLflow run id and
step, the SHA-256 of the resolved config, of the training catalogs, and the code version.

* Config: SHA-256 of the resolved config as saved with the run (credentials redacted,
  ``pipeline.secrets``), in canonical JSON (keys sorted, no spaces), so that the same config
  gives the same digest whatever the YAML's layout.
* Catalog: each training dataset's split catalog (``index.parquet``) hashed byte for byte;
  the record is a JSON object ``{dataset name: SHA-256}``, one entry per ``data.train`` source.
* Code: the package version, plus ``+g<commit>`` when the package is imported from a git
  checkout (``+dirty`` when tracked files differ from that commit); read once per process,
  without network.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pipeline
from pipeline.config.runconfig import RunConfig, to_dict
from pipeline.config.schema import DataConfig
from pipeline.data import storage
from pipeline.data.catalog import INDEX_FILE, split_dir
from pipeline.secrets import redact_tree


def canonical_json(tree: Any) -> str:
    """``tree`` as JSON with sorted keys and no spaces: one text per value."""
    return json.dumps(tree, sort_keys=True, separators=(",", ":"))


def config_sha256(cfg: RunConfig) -> str:
    """SHA-256 of the resolved config in canonical JSON, credentials redacted."""
    return hashlib.sha256(canonical_json(redact_tree(to_dict(cfg))).encode()).hexdigest()


def catalog_sha256(data_cfg: DataConfig) -> dict[str, str]:
    """Each training dataset's name -> SHA-256 of its split's ``index.parquet`` bytes."""
    out = {}
    for source in data_cfg.train:
        try:
            url = str(split_dir(source.urls) / INDEX_FILE)
            out[source.name] = hashlib.sha256(storage.read_bytes(url)).hexdigest()
        except (OSError, ValueError) as e:
            # Preflight read these catalogs before training: one gone since must not cost the
            # run its weights; the record says what happened instead.
            out[source.name] = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0]})"
    return out


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()


@functools.cache
def code_version() -> str:
    """``<package version>[+g<commit>[+dirty]]`` (the commit when the package's source tree is
    a git checkout; no network)."""
    version = pipeline.__version__
    root = Path(pipeline.__file__).resolve().parent.parent
    if not (root / ".git").exists():  # an installed wheel: no checkout to ask
        return version
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git installed, or not a repository
        return version
    return f"{version}+g{commit[:12]}" + ("+dirty" if dirty else "")


def training_provenance(cfg: RunConfig, *, run_id: str | None, step: int) -> dict[str, str]:
    """The provenance entries of a run's weights file (safetensors metadata: strings);
    ``run_id``: the MLflow run ('' or None when tracking is off)."""
    return {
        "run_id": run_id or "",
        "step": str(int(step)),
        "config_sha256": config_sha256(cfg),
        "catalog_sha256": canonical_json(catalog_sha256(cfg.data)),
        "code_version": code_version(),
    }
