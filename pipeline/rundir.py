"""The run directory (``train.output_dir``): the one module that knows its file names.

Layout::

    config.yaml          the resolved config (loadable with ``pipeline train --config``)
    mlflow_run.txt       the MLflow run id, so that a resumed or continued job logs to it
    result.json          what ``pipeline train`` returned (its presence marks a finished run)
    model.safetensors    the final fp32 weights, architecture in the metadata
    curves.png           loss and retrieval curves of the run
    demo.json            ``pipeline demo``: untrained vs trained metrics
    checkpoints/         DeepSpeed checkpoints and ``latest`` (pipeline.train.checkpoint)
    eval/                the final evaluation (unless ``eval.output_dir`` says otherwise)
    logs/rank<R>.log     one log per rank (pipeline.logs.setup_logging)
    .lock                held by the job training here (pipeline.train.runlock)

Reading and writing go through :class:`RunDir`; other modules ask it for paths instead of
joining names themselves, so a change of layout touches this file only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.config.schema import RunConfig


class RunDir:
    """Paths of one run directory and the small files in it. Creates nothing until written."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, cfg: RunConfig) -> RunDir:
        """The run directory of a run config (``train.output_dir``)."""
        return cls(cfg.train.output_dir)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # Paths ------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_id_file(self) -> Path:
        return self.root / "mlflow_run.txt"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def demo(self) -> Path:
        return self.root / "demo.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def log_file(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    # Small files --------------------------------------------------------------------------
    def read_run_id(self) -> str | None:
        """The recorded MLflow run id, or None."""
        path = self.run_id_file
        return (path.read_text().strip() or None) if path.is_file() else None

    def write_run_id(self, run_id: str) -> None:
        _write_text(self.run_id_file, run_id)

    def read_result(self) -> dict[str, Any] | None:
        """The recorded result of a finished run, or None."""
        return json.loads(self.result.read_text()) if self.result.is_file() else None

    def write_result(self, result: dict[str, Any]) -> None:
        _write_text(self.result, json.dumps(result, indent=1))


def _write_text(path: Path, text: str) -> None:
    # Through a temporary file and a rename: a reader (a resumed job, the demo) never sees
    # half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def eval_output_dir(cfg: RunConfig) -> Path:
    """Where evaluation writes: ``eval.output_dir``, else the run directory's ``eval/``."""
    return Path(cfg.eval.output_dir) if cfg.eval.output_dir else RunDir.of(cfg).eval
