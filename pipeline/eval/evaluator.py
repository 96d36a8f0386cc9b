"""``pipeline evaluate``: embed the eval shards with a trained model and measure retrieval.

    pipeline evaluate --config conf/demo.yaml --weights runs/demo/model.safetensors [--out DIR]

It writes a folder of its own (pipeline.eval.destination): by default
``runs/demo/evaluations/<UTC time>/``, never the training run's own ``eval/``.

All ranks take part (one process, torchrun or srun): each embeds its part of the eval shards
(every sample exactly once, tagged with its catalog row), the embeddings are gathered, and
the protocol that ``eval.protocol`` names (``pipeline.eval.protocols``: retrieval with sharded
FAISS kNN, VGGFace2, IJB-C) computes the metrics. Rank 0 writes ``embeddings.npy`` /
``labels.npy`` / ``index.npy`` (rows in global-index order), ``metrics.json`` and the protocol's
files (a retrieval example grid, or the IJB-C ROC curve and the mirrored faces' features), and
logs metrics, the protocol's tags and figures to MLflow. :func:`evaluate_model` is the same evaluation for the training
loop. ``metrics.json`` names the weights measured under ``weights`` (their identity, the file
or checkpoint tag read, run id and step where known; ``pipeline.weights``), and so do the
MLflow run's tags.

Shape legend: N samples, D embedding dims, B batch.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import logs
from pipeline.config.load import add_config_arguments, load_config, named_model, split_weights
from pipeline.config.runconfig import RunConfig, to_dict
from pipeline.config.schema import DataConfig
from pipeline.config.schema_services import EvalConfig
from pipeline.data.transforms import crop_for_weights
from pipeline.distributed import collectives, group
from pipeline.eval import protocols
from pipeline.eval.destination import evaluation_folder
from pipeline.eval.extract import Embeddings, extract_embeddings
from pipeline.eval.protocols import Result, preflight
from pipeline.model import load_trained_model
from pipeline.rundir import EvalDir
from pipeline.tracking.mlflow import MlflowTracker, run_page
from pipeline.tracking.session import tracking_session
from pipeline.weights import IDENTITY_KEY, model_weights_record, resolve_weights_path

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- metrics


def compute_metrics(
    e: Embeddings, data_cfg: DataConfig, eval_cfg: EvalConfig, *, device: Any = "cpu"
) -> Result:
    """The figures of the protocol ``eval_cfg.protocol`` (pipeline.eval.protocols).

    All ranks participate and get the same result.
    """
    protocol = protocols.get(eval_cfg.protocol)
    if protocol.main_only:
        # All ranks participate: rank 0 computes, every rank gets its result or its error.
        return collectives.on_main(lambda: protocol.compute(e, data_cfg, eval_cfg, device))
    return protocol.compute(e, data_cfg, eval_cfg, device)  # all ranks participate


def tracked_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The MLflow names of evaluation metrics, the same for ``pipeline evaluate``, training
    and the merge of array parts: ``eval/<metric>`` (``eval/map@r`` is stored as
    ``eval/map_at_r``, pipeline.tracking.base.metric_key)."""
    return {f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def evaluate_model(
    model: torch.nn.Module,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    *,
    device: torch.device | str,
    output_dir: str | Path | None = None,
    tracker: Any = None,
    step: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Embed ``data_cfg.eval_urls`` with ``model`` and return the metrics (same on all ranks).

    All ranks participate. With ``output_dir``, rank 0 writes the embeddings, metrics.json
    (naming the weights: those ``model`` was loaded from, else the identity of the weights it
    holds at training step ``step``) and the figure there; with ``tracker``
    (pipeline.tracking), metrics (as :func:`tracked_metrics`) and files go to MLflow at ``step``.
    """
    protocol = protocols.get(eval_cfg.protocol)
    e = extract_embeddings(
        model,
        data_cfg.eval_urls,
        data_cfg,
        device=device,
        batch_size=eval_cfg.batch_size,
        progress=progress,
        extraction=protocol.extraction(eval_cfg),
    )
    result = compute_metrics(e, data_cfg, eval_cfg, device=device)
    files: list[Path] = []
    if output_dir is not None and group.is_main_process():
        in_memory = getattr(model, "weights_origin", None) is None
        run_id = getattr(tracker, "run_id", None) if in_memory else None
        known = {"step": step, "run_id": run_id} if in_memory else None
        weights = model_weights_record(model, known)
        files = write_outputs(Path(output_dir), e, result, data_cfg, eval_cfg, weights=weights)
    if tracker is not None:
        log_result(tracker, result, files, step)
    collectives.barrier()  # all ranks participate: files exist when evaluate_model returns
    return result.metrics


def log_result(tracker: Any, result: Result, files: list[Path], step: int) -> None:
    """Metrics (as :func:`tracked_metrics`), the protocol's tags and ``files`` to MLflow."""
    tracker.log_metrics(tracked_metrics(result.metrics), step)
    if result.tags:
        tracker.set_tags(result.tags)
    for f in files:
        tracker.log_artifact(f, "eval")


# ---------------------------------------------------------------------------- outputs


def write_outputs(
    out: Path,
    e: Embeddings,
    result: Result,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    *,
    weights: dict[str, Any] | None = None,
) -> list[Path]:
    """Write embeddings (.npy, rows in catalog order with their rows in index.npy),
    metrics.json (the metrics, the protocol's record and ``weights``, the record of the
    weights measured) and the protocol's files; return the small files worth logging
    (metrics and figure, not the embeddings)."""
    out.mkdir(parents=True, exist_ok=True)
    names = EvalDir(out)
    np.save(names.embeddings, e.emb_ND)
    np.save(names.labels, e.labels_N)
    np.save(names.rows, e.row_N)
    metrics_file = names.metrics
    record = {**result.metrics, **result.record}
    if weights is not None:
        record["weights"] = weights
    metrics_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    own = protocols.get(eval_cfg.protocol).write(out, e, result, data_cfg, eval_cfg)
    return [metrics_file, *own]


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        "config overrides such as eval.protocol=ijbc data.eval_urls=DIR",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where to write (default: eval.output_dir, else <run>/evaluations/<UTC time>/ "
        "of the run whose weights are evaluated)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="allow writing into a training run's own evaluation folder (its eval/)",
    )


def _preflight(cfg: RunConfig) -> None:
    preflight(cfg, group.get_world_size(), train=False)
    if cfg.tracking.enabled:
        MlflowTracker.check(cfg.tracking)


def run(args: argparse.Namespace) -> int:
    checkpoint, overrides = split_weights(args.weights, args.overrides)
    cfg: RunConfig = load_config(args.config, overrides)
    cfg = replace(cfg, data=crop_for_weights(cfg.data, checkpoint))
    out_arg, force = getattr(args, "out", None), getattr(args, "force", False)  # old job pickles
    # Joins the job's group (none for one process) and always leaves it.
    with group.process_group():
        # All ranks participate: rank 0 names the folder (it reads the clock), never a
        # training run's own evaluation unless forced.
        out = collectives.on_main(lambda: evaluation_folder(cfg, checkpoint, out_arg, force=force))
        rank = group.process_rank()
        logs.setup_logging(EvalDir(out).log_file(rank), rank=rank)
        # All ranks participate: a checkpoint root is resolved to one tag, on rank 0, so that
        # every rank embeds with the same step even while a run moves its 'latest'.
        path, root = collectives.on_main(lambda: resolve_weights_path(checkpoint))
        model = load_trained_model(path, named_model(args.config, overrides, cfg))
        origin = model.weights_origin = replace(model.weights_origin, resolved_from=root)
        if root:
            log.info(origin.describe())
        # All ranks participate: the eval shards and the tracking store are checked in
        # seconds, before anything is embedded.
        collectives.on_main(lambda: _preflight(cfg))
        device = group.device()
        model.to(device)
        is_main = group.is_main_process()
        params = {**to_dict(cfg), "checkpoint": origin.path}
        tags = {"kind": "evaluate", "world_size": str(group.get_world_size())}
        tags |= {IDENTITY_KEY: origin.weights_sha256, "weights_step": str(origin.step)}
        with tracking_session(cfg.tracking, is_main=is_main, params=params, tags=tags) as tracker:
            # All ranks participate.
            metrics = evaluate_model(
                model, cfg.data, cfg.eval, device=device, output_dir=out, tracker=tracker
            )
        if is_main:
            # stdout carries the metrics table (the command's output); messages go to the log.
            width = max(len(k) for k in metrics)
            for k, v in metrics.items():
                print(f"{k:<{width}}  {v:.0f}" if "num_" in k else f"{k:<{width}}  {v:.4f}")
            log.info("wrote %s/metrics.json and embeddings.npy", out)
            if tracker.run_id:
                page = run_page(tracker.uri, tracker.experiment_id, tracker.run_id)
                log.info("MLflow run %s: %s", tracker.run_id, page)
    return 0
