"""Evaluation in parts: embed shard ranges separately, then merge and score (a Slurm array job
for evaluations too large for one job, launch.evaluation).

Part i embeds a contiguous range of the eval shards (with as many ranks as its job has) and
writes ``<eval dir>/parts/part_{i:05d}.npz`` (embeddings, labels, global sample indices and a
fingerprint of what it was computed from). The merge loads the parts, checks that every sample
arrived exactly once, and computes the metrics with the same code as ``pipeline evaluate``
(:func:`pipeline.eval.evaluator.compute_metrics` and ``write_outputs``). A part already
written from the same weights and shards is not recomputed; a part left by another evaluation
in the same folder is never used.

Sample indices are global (each sample's row in the split's ``index.parquet``, stored in the
shard), so the parts can be merged in any order. ``launch.evaluation`` submits these as a
Slurm array job and a dependent merge job.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config.runconfig import RunConfig, to_dict
from pipeline.data.catalog import expand_urls, read_index
from pipeline.data.transforms import crop_for_weights
from pipeline.distributed import collectives, group
from pipeline.eval import protocols
from pipeline.eval.evaluator import compute_metrics, log_result, write_outputs
from pipeline.eval.extract import extract_embeddings, sort_by_row
from pipeline.eval.protocols import PLAIN, Embeddings, Extraction
from pipeline.model import load_trained_model
from pipeline.rundir import EvalDir, eval_output_dir
from pipeline.tracking.session import tracking_session
from pipeline.weights import IDENTITY_KEY, read_trained_weights

log = logging.getLogger(__name__)


def plan_parts(eval_urls: str, parts: int) -> list[list[str]]:
    """Split the eval shards into at most ``parts`` contiguous, balanced ranges (by count)."""
    if parts < 1:
        raise ValueError(f"--parts {parts}: must be >= 1")
    urls = expand_urls(eval_urls)
    n = min(parts, len(urls))
    return [urls[i * len(urls) // n : (i + 1) * len(urls) // n] for i in range(n)]


def fingerprint(checkpoint: str, urls: list[str], extraction: Extraction = PLAIN) -> str:
    """What a part was computed from: the weights (path, size, mtime), its shards and what was
    taken from the model (mirrored images, unnormalised embeddings). A part with another
    fingerprint (an earlier evaluation in the same folder) is never reused."""
    st = os.stat(checkpoint)
    stamp = f"{checkpoint}|{st.st_size}|{st.st_mtime_ns}|" + "::".join(urls)
    if extraction != PLAIN:  # the plain extraction keeps the stamps parts already have
        stamp += f"|flip={extraction.flip}|unnormalized={extraction.unnormalized}"
    return stamp


def read_fingerprint(path: Path) -> str | None:
    """The fingerprint stored in a part file, or None (absent or unreadable)."""
    try:
        with np.load(path) as f:
            return str(f["fingerprint"])
    except (OSError, KeyError, ValueError):
        return None


def extract_part(cfg: RunConfig, checkpoint: str, part: int, urls: list[str]) -> dict[str, Any]:
    """Embed the shards ``urls`` with the weights ``checkpoint`` into part file ``part``
    (rank 0 writes); a part already computed from the same inputs is kept. Joins and leaves
    the process group itself. All ranks participate."""
    # The face crop recorded with the weights picks the transform (a mismatch: one line).
    cfg = replace(cfg, data=crop_for_weights(cfg.data, checkpoint))
    path = EvalDir.of(cfg).part(part)
    extraction = protocols.get(cfg.eval.protocol).extraction(cfg.eval)
    stamp = fingerprint(checkpoint, urls, extraction)
    if read_fingerprint(path) == stamp:  # requeued or resubmitted: this part is done
        with np.load(path) as f:
            return {"part": part, "rows": int(f["index"].shape[0]), "path": str(path)}
    # Joins the job's group (none for one process) and always leaves it.
    with group.process_group():
        device = group.device()
        model = load_trained_model(checkpoint, cfg.model).to(device)
        # All ranks participate: each embeds its share of these shards; all get every row.
        e = extract_embeddings(
            model,
            "::".join(urls),
            cfg.data,
            device=device,
            batch_size=cfg.eval.batch_size,
            progress=False,
            extraction=extraction,
        )
        if group.is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            arrays = {"emb": e.emb_ND, "labels": e.labels_N, "index": e.row_N}
            if e.flip_ND is not None:
                arrays["flip"] = e.flip_ND
            np.savez(tmp, **arrays, fingerprint=stamp)
            os.replace(tmp, path)  # a part file is complete or absent
        collectives.barrier()  # all ranks participate
    log.info("part %d: %d samples from %d shards", part, len(e.row_N), len(urls))
    return {"part": part, "rows": len(e.row_N), "path": str(path)}


def merge_parts(
    out: Path, parts: int, expected_rows: int | None, stamps: list[str] | None = None
) -> Embeddings:
    """All parts as one :class:`Embeddings` sorted by catalog row.

    ``stamps``: the fingerprint each part must carry. Raises ValueError naming a missing or
    stale part, a sample seen twice, or a wrong total.
    """
    missing = [
        str(EvalDir(out).part(i)) for i in range(parts) if not EvalDir(out).part(i).is_file()
    ]
    if missing:
        raise ValueError(
            f"{len(missing)} of {parts} evaluation parts are missing ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): an array task failed; read its log in "
            "the job folder, then resubmit (finished parts are kept)"
        )
    for i, stamp in enumerate(stamps or []):
        if read_fingerprint(EvalDir(out).part(i)) != stamp:
            raise ValueError(
                f"{EvalDir(out).part(i)} was computed from other weights or shards than this "
                "evaluation: delete the parts folder (or use another eval.output_dir) and resubmit"
            )
    embs, labels, indices, flips = [], [], [], []
    for i in range(parts):
        with np.load(EvalDir(out).part(i)) as f:
            embs.append(f["emb"])
            labels.append(f["labels"])
            indices.append(f["index"])
            if "flip" in f:
                flips.append(f["flip"])
    if flips and len(flips) != parts:
        raise ValueError(
            f"only {len(flips)} of {parts} parts under {EvalDir(out).parts} hold mirrored-image "
            "features: they were extracted with different eval settings; delete the parts "
            "folder and resubmit"
        )
    e, repeated = sort_by_row(
        np.concatenate(embs),
        np.concatenate(labels),
        np.concatenate(indices),
        np.concatenate(flips) if flips else None,
    )
    if len(repeated):
        raise ValueError(
            f"catalog row {int(repeated[0])} appears in two parts under {EvalDir(out).parts}: "
            "data.eval_urls lists a shard twice, or the parts come from different runs; "
            "delete the parts folder and resubmit"
        )
    if expected_rows is not None and len(e.row_N) != expected_rows:
        raise ValueError(
            f"the parts under {EvalDir(out).parts} hold {len(e.row_N)} samples, the eval split's "
            f"index.parquet lists {expected_rows}: delete the parts folder and resubmit"
        )
    return e


def expected_rows(eval_urls: str) -> int | None:
    """Samples of the whole split when data.eval_urls is a split directory (else unknown)."""
    if not os.path.isdir(eval_urls):
        return None
    try:
        return read_index(eval_urls).num_rows
    except FileNotFoundError:
        return None


def merge_and_score(cfg: RunConfig, checkpoint: str, plan: list[list[str]]) -> dict[str, Any]:
    """Merge the parts of ``plan``, compute and write the metrics and log them to MLflow as
    one evaluation run. Joins and leaves the process group itself. All ranks participate.

    Returns ``metrics``, ``run_id`` (MLflow; None off rank 0) and ``output_dir``.
    """
    out = eval_output_dir(cfg)
    extraction = protocols.get(cfg.eval.protocol).extraction(cfg.eval)
    stamps = [fingerprint(checkpoint, urls, extraction) for urls in plan]
    e = merge_parts(out, len(plan), expected_rows(cfg.data.eval_urls), stamps)
    origin = read_trained_weights(checkpoint)[3]  # what the parts embedded with
    # Joins the job's group (none for one process) and always leaves it.
    with group.process_group():
        is_main = group.is_main_process()
        params = {**to_dict(cfg), "checkpoint": checkpoint, "parts": len(plan)}
        tags = {"kind": "evaluate", "parts": str(len(plan)), IDENTITY_KEY: origin.weights_sha256}
        tags["weights_step"] = str(origin.step)
        with tracking_session(cfg.tracking, is_main=is_main, params=params, tags=tags) as tracker:
            # All ranks participate (sharded kNN when the merge job has several).
            result = compute_metrics(e, cfg.data, cfg.eval, device=group.device())
            metrics = result.metrics
            # Files on rank 0 only; no collective in here.
            files = []
            if is_main:
                files = write_outputs(out, e, result, cfg.data, cfg.eval, weights=origin.record())
            log_result(tracker, result, files, 0)
            run_id = tracker.run_id
        log.info("merged %d parts (%d samples): %s", len(plan), len(e.row_N), metrics)
        collectives.barrier()  # all ranks participate: the files exist when any rank returns
    return {"metrics": metrics, "run_id": run_id, "output_dir": str(out)}
