"""The run directory (``train.output_dir``): the one module that knows its file names.

Layout::

    config.yaml          the resolved config (loadable with ``pipeline train --config``)
    mlflow_run.txt       the MLflow run id, so that a resumed or continued job logs to it
    result.json          what ``pipeline train`` returned (its presence marks a finished run)
    model.safetensors    the final fp32 weights, architecture in the metadata
    curves.png           loss and retrieval curves of the run
    demo.json            ``pipeline demo``: untrained vs trained metrics
    mlflow_undelivered.jsonl  tracking records the store did not take in time, for
                         ``python -m pipeline.tracking upload`` (pipeline.tracking.outbox)
    checkpoints/         DeepSpeed checkpoints and ``latest`` (pipeline.train.checkpoint)
    eval/                the final evaluation (unless ``eval.output_dir`` says otherwise): an
                         :class:`EvalDir`
    evaluations/<time>/  each later ``pipeline evaluate`` of the run's weights: an EvalDir
    data_catalogs.json   the content digest of each training split's catalog, by location
                         (pipeline.train.finished)
    launch/rank<R>.json  where each rank of a Slurm job ran (launch.jobs.record_rank_env)
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

from pipeline.config.runconfig import RunConfig
from pipeline.secrets import redact_tree


class RunDir:
    """Paths of one run directory and the small files in it. Creates nothing until written."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, cfg: RunConfig) -> RunDir:
        """The run directory of a run config (``train.output_dir``)."""
        return cls(cfg.train.output_dir)

    @classmethod
    def holding(cls, weights: str | Path) -> RunDir | None:
        """The training run whose weights ``weights`` names (its model.safetensors, its
        checkpoints/ or one checkpoint in it), or None for weights outside a run folder."""
        path = Path(weights).resolve()
        for root in (path.parent, path.parent.parent):
            run = cls(root)
            inside = path in (run.weights, run.checkpoints) or path.parent == run.checkpoints
            if inside and run.config.is_file():
                return run
        return None

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
    def evaluations(self) -> Path:
        return self.root / "evaluations"

    @property
    def data_catalogs(self) -> Path:
        return self.root / "data_catalogs.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def log_file(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    @property
    def undelivered(self) -> Path:
        return self.root / "mlflow_undelivered.jsonl"

    def launch_record(self, rank: int) -> Path:
        return self.root / "launch" / f"rank{rank}.json"

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
        _write_text(self.result, json.dumps(redact_tree(result), indent=1))


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


class EvalDir:
    """An evaluation's folder (``pipeline evaluate``, a run's final evaluation, the parts of a
    split evaluation): the one place that names its files. Layout::

        metrics.json          the metrics (what ``pipeline evaluate`` prints)
        embeddings.npy        the embeddings, one row per sample, in row order
        labels.npy            their labels
        index.npy             their rows (a sample's global position in the split)
        embeddings_flip.npy   IJB-C with flip test: the mirrored images' embeddings, same rows
        det_score.npy         IJB-C with detector scores: each row's score
        roc.png               IJB-C: the ROC curve
        retrieval_grid.png    other protocols: queries and their nearest neighbours
        parts/part_NNNNN.npz  a split evaluation's parts, before the merge (pipeline.eval.parts)
        logs/rank<R>.log      one log per rank of ``pipeline evaluate``
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, cfg: RunConfig) -> EvalDir:
        """The evaluation folder of a run config (:func:`eval_output_dir`)."""
        return cls(eval_output_dir(cfg))

    def __repr__(self) -> str:
        return f"EvalDir({str(self.root)!r})"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings.npy"

    @property
    def labels(self) -> Path:
        return self.root / "labels.npy"

    @property
    def rows(self) -> Path:
        return self.root / "index.npy"  # the name evaluations have always written

    @property
    def embeddings_flip(self) -> Path:
        return self.root / "embeddings_flip.npy"

    @property
    def det_scores(self) -> Path:
        return self.root / "det_score.npy"

    @property
    def roc(self) -> Path:
        return self.root / "roc.png"

    @property
    def retrieval_grid(self) -> Path:
        return self.root / "retrieval_grid.png"

    @property
    def parts(self) -> Path:
        return self.root / "parts"

    def part(self, part: int) -> Path:
        return self.parts / f"part_{part:05d}.npz"

    def log_file(self, rank: int) -> Path:
        return self.root / "logs" / f"rank{rank}.log"

    def read_metrics(self) -> dict[str, float]:
        return json.loads(self.metrics.read_text())
