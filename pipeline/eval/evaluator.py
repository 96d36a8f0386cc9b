"""``pipeline evaluate``: embed the eval shards with a trained model and measure retrieval.

    pipeline evaluate --config conf/demo.yaml checkpoint=runs/demo/model.safetensors [key=value ...]

All ranks take part (one process, torchrun or srun): each embeds its part of the eval shards
(every sample exactly once, tagged with its global index), the embeddings are gathered, and
the metrics are computed (retrieval: sharded FAISS kNN, see ``pipeline.eval.metrics``; IJB-C:
``pipeline.eval.ijbc``). Rank 0 writes ``embeddings.npy`` / ``labels.npy`` / ``index.npy`` (rows in
global-index order), ``metrics.json``, a retrieval example grid or the IJB-C ROC curve, and logs
metrics and figures to MLflow. :func:`evaluate_model` is the same evaluation for the training
loop.

Shape legend: N samples, D embedding dims, B batch.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import logs
from pipeline.config.load import add_config_arguments, load_config, named_model, split_weights
from pipeline.config.schema import DataConfig, EvalConfig, RunConfig, to_dict
from pipeline.data.catalog import read_index, split_dir
from pipeline.data.stream import read_shard
from pipeline.data.transforms import decode_image
from pipeline.distributed import collectives, group
from pipeline.eval.extract import Embeddings, extract_embeddings
from pipeline.eval.ijbc import ijbc_metrics, load_protocol
from pipeline.eval.metrics import l2_normalize, retrieval_metrics
from pipeline.model import load_trained_model
from pipeline.plots import retrieval_grid_png, roc_png
from pipeline.preflight import preflight
from pipeline.rundir import EvalDir, eval_output_dir
from pipeline.tracking.mlflow import MlflowTracker, run_page
from pipeline.tracking.session import tracking_session

log = logging.getLogger(__name__)

GRID_QUERIES = 8
GRID_NEIGHBOURS = 5


# ---------------------------------------------------------------------------- metrics


def _ijbc_ids(data_cfg: DataConfig, index_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Template and media id of each extracted sample, from the split's index.parquet."""
    table = read_index(data_cfg.eval_urls)
    missing = [c for c in ("template_id", "media_id") if c not in table.column_names]
    if missing:
        raise ValueError(
            f"data.eval_urls={data_cfg.eval_urls!r}: index.parquet has no {missing} column; "
            "eval.protocol=ijbc needs shards written by `pipeline make-shards --format ijbc`"
        )
    t = table.column("template_id").to_numpy(zero_copy_only=False)
    m = table.column("media_id").to_numpy(zero_copy_only=False)
    if index_N.max() >= len(t):
        raise ValueError(
            f"sample index {int(index_N.max())} is beyond index.parquet ({len(t)} rows): the "
            "shards and their index.parquet come from different make-shards runs"
        )
    return np.asarray(t[index_N], np.int64), np.asarray(m[index_N], np.int64)


def compute_metrics(
    e: Embeddings, data_cfg: DataConfig, eval_cfg: EvalConfig, *, device: Any = "cpu"
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of the protocol ``eval_cfg.protocol`` (and the ROC curve for IJB-C).

    All ranks participate and return the same values.
    """
    if eval_cfg.protocol == "ijbc":

        def ijbc() -> tuple[dict[str, float], dict[str, Any]]:
            templates, media = _ijbc_ids(data_cfg, e.index_N)
            protocol = load_protocol(eval_cfg.ijbc_protocol or split_dir(data_cfg.eval_urls))
            return ijbc_metrics(e.emb_ND, templates, media, protocol)

        # Plain NumPy on one process: pooling + 15.6M pairs take ~30 s on 2 cores.
        return collectives.on_main(ijbc)  # all ranks participate

    metrics = retrieval_metrics(
        e.emb_ND,
        e.labels_N,
        eval_cfg.ks,
        full_map=eval_cfg.full_map,
        query_block=eval_cfg.query_block,
        device=device,
    )
    return metrics, {}


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

    All ranks participate. With ``output_dir``, rank 0 writes the embeddings, metrics.json and
    the figure there; with ``tracker`` (pipeline.tracking), metrics (as
    :func:`tracked_metrics`) and files go to MLflow at ``step``.
    """
    e = extract_embeddings(
        model,
        data_cfg.eval_urls,
        data_cfg,
        device=device,
        batch_size=eval_cfg.batch_size,
        progress=progress,
    )
    metrics, extras = compute_metrics(e, data_cfg, eval_cfg, device=device)
    if output_dir is not None and group.is_main_process():
        files = write_outputs(Path(output_dir), e, metrics, extras, data_cfg, eval_cfg)
        if tracker is not None:
            tracker.log_metrics(tracked_metrics(metrics), step)
            for f in files:
                tracker.log_artifact(f, "eval")
    elif tracker is not None:
        tracker.log_metrics(tracked_metrics(metrics), step)
    collectives.barrier()  # all ranks participate: files exist when evaluate_model returns
    return metrics


# ---------------------------------------------------------------------------- outputs


def write_outputs(
    out: Path,
    e: Embeddings,
    metrics: dict[str, float],
    extras: dict[str, Any],
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
) -> list[Path]:
    """Write embeddings (.npy), metrics.json and the protocol's figure; return the small files
    worth logging (metrics and figure, not the embeddings)."""
    out.mkdir(parents=True, exist_ok=True)
    names = EvalDir(out)
    np.save(names.embeddings, e.emb_ND)
    np.save(names.labels, e.labels_N)
    np.save(names.rows, e.index_N)
    files = [names.metrics]
    files[0].write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if eval_cfg.protocol == "ijbc":
        tar = {
            float(k.split("=", 1)[1]): v for k, v in metrics.items() if k.startswith("ijbc_tar@")
        }
        files.append(roc_png(extras["fpr"], extras["tpr"], tar, names.roc))
    else:
        grid = retrieval_grid(e, data_cfg, names.retrieval_grid)
        if grid is not None:
            files.append(grid)
    return files


def _grid_queries(labels_N: np.ndarray, n: int) -> np.ndarray:
    """``n`` queries spread evenly over the rows that have a positive (deterministic)."""
    _, inverse, counts = np.unique(labels_N, return_inverse=True, return_counts=True)
    rows = np.flatnonzero(counts[inverse.reshape(-1)] > 1)
    return rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)]


def _read_images(data_cfg: DataConfig, index: set[int], side: int = 96) -> dict[int, np.ndarray]:
    """Thumbnails of the samples with these global indices, read from their shards."""
    table = read_index(data_cfg.eval_urls).select(["index", "key", "shard"]).to_pydict()
    where = {i: (table["shard"][i], table["key"][i]) for i in index if i < len(table["index"])}
    root = split_dir(data_cfg.eval_urls)
    images: dict[int, np.ndarray] = {}
    for shard in sorted({s for s, _ in where.values()}):
        wanted = {k: i for i, (s, k) in where.items() if s == shard}
        for raw in read_shard(str(root / shard)):
            if raw.key in wanted:
                img = decode_image(raw.data).convert("RGB")
                img = img.resize((side, side), Image.BILINEAR)
                images[wanted[raw.key]] = np.asarray(img)
    return images


def retrieval_grid(e: Embeddings, data_cfg: DataConfig, path: Path) -> Path | None:
    """Queries with their top-5 neighbours (green: same label, red: not), or None (and a
    printed reason) when the images cannot be read back (remote shards)."""
    q_rows = _grid_queries(e.labels_N, GRID_QUERIES)
    emb = l2_normalize(e.emb_ND)
    sims = emb[q_rows] @ emb.T  # a few rows of the similarity matrix
    sims[np.arange(len(q_rows)), q_rows] = -np.inf  # the query itself, by index
    order = np.lexsort((np.broadcast_to(np.arange(emb.shape[0]), sims.shape), -sims), axis=1)
    nb_rows = order[:, :GRID_NEIGHBOURS]
    wanted = {int(e.index_N[r]) for r in np.concatenate([q_rows, nb_rows.ravel()])}
    try:
        images = _read_images(data_cfg, wanted)
    except (FileNotFoundError, ValueError, OSError) as err:
        log.warning("no retrieval grid: cannot read the eval images back (%s)", err)
        return None
    missing = wanted - images.keys()
    if missing:
        log.warning("no retrieval grid: %d images not found in their shards", len(missing))
        return None
    return retrieval_grid_png(
        [images[int(e.index_N[q])] for q in q_rows],
        [[images[int(e.index_N[r])] for r in row] for row in nb_rows],
        [[bool(e.labels_N[r] == e.labels_N[q]) for r in row] for q, row in zip(q_rows, nb_rows)],
        path,
        titles=[f"index {int(e.index_N[q])}" for q in q_rows],
    )


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        "config overrides such as eval.protocol=ijbc data.eval_urls=DIR",
    )


def _preflight(cfg: RunConfig) -> None:
    preflight(cfg, group.get_world_size(), train=False)
    if cfg.tracking.enabled:
        MlflowTracker.check(cfg.tracking)


def run(args: argparse.Namespace) -> int:
    checkpoint, overrides = split_weights(args.weights, args.overrides)
    cfg: RunConfig = load_config(args.config, overrides)
    out = eval_output_dir(cfg)
    rank = group.process_rank()
    logs.setup_logging(EvalDir(out).log_file(rank), rank=rank)
    # Joins the job's group (none for one process) and always leaves it.
    with group.process_group():
        model = load_trained_model(checkpoint, named_model(args.config, overrides, cfg))
        # All ranks participate: the eval shards and the tracking store are checked in
        # seconds, before anything is embedded.
        collectives.on_main(lambda: _preflight(cfg))
        device = group.device()
        model.to(device)
        is_main = group.is_main_process()
        params = {**to_dict(cfg), "checkpoint": checkpoint}
        tags = {"kind": "evaluate", "world_size": str(group.get_world_size())}
        with tracking_session(cfg.tracking, is_main=is_main, params=params, tags=tags) as tracker:
            # All ranks participate.
            metrics = evaluate_model(
                model, cfg.data, cfg.eval, device=device, output_dir=out, tracker=tracker
            )
        if is_main:
            # stdout carries the metrics table (the command's output); messages go to the log.
            width = max(len(k) for k in metrics)
            for k, v in metrics.items():
                print(
                    f"{k:<{width}}  {v:.0f}" if k.startswith("num_") else f"{k:<{width}}  {v:.4f}"
                )
            log.info("wrote %s/metrics.json and embeddings.npy", out)
            if tracker.run_id:
                page = run_page(tracker.uri, tracker.experiment_id, tracker.run_id)
                log.info("MLflow run %s: %s", tracker.run_id, page)
    return 0
