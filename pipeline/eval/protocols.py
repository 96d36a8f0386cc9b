"""The evaluation protocols, one registry entry each: what ``eval.protocol`` can name.

A :class:`Protocol` is everything the pipeline decides about one way of measuring a model:

* ``check_config(cfg, selected)``: its cross-section config rules, run with the others when a
  config loads (``selected``: whether ``cfg.eval.protocol`` names it; a protocol may also
  refuse its own keys being set for another protocol);
* ``preflight(cfg, split)``: what the eval split's catalog must hold, checked in seconds
  before anything is embedded (PreflightError); returns lines for the preflight report;
* ``extraction(eval_cfg)``: what to take from the model (mirrored images, the embedding
  before its L2 normalisation);
* ``compute(e, data_cfg, eval_cfg, device)``: the figures (all ranks participate, or rank 0
  alone for a ``main_only`` protocol);
* ``write(out, e, result, data_cfg, eval_cfg)``: its own files beside the generic ones
  (rank 0; no collective).

The evaluator, the preflight of every entry point (:func:`preflight`) and the config rules
only consult :data:`REGISTRY`, so a new protocol is one :func:`register` call in one file.

Shape legend: N samples, D embedding dims.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config.runconfig import RunConfig
from pipeline.config.schema import ConfigError, DataConfig
from pipeline.config.schema_services import EvalConfig
from pipeline.data.catalog import INDEX_FILE, _is_remote, read_index, split_dir
from pipeline.errors import UserError
from pipeline.eval.grid import retrieval_grid
from pipeline.eval.ijbc import IJBSettings, ijbc_metrics, image_features, load_protocol
from pipeline.eval.metrics import retrieval_metrics
from pipeline.plots import roc_png
from pipeline.preflight import EvalSplit, PreflightError, PreflightReport
from pipeline.preflight import preflight as preflight_shards
from pipeline.rundir import EvalDir

log = logging.getLogger(__name__)


class ProtocolDataError(UserError, ValueError):
    """The eval data cannot be measured by the configured protocol (found while computing);
    the message says why and the fix."""


@dataclass
class Embeddings:
    """The whole eval set, sorted by catalog row (the row in the split's index.parquet)."""

    emb_ND: np.ndarray
    labels_N: np.ndarray
    row_N: np.ndarray
    flip_ND: np.ndarray | None = None
    """The model on each image's horizontal mirror (extracted with ``flip=True``), else None."""


@dataclass(frozen=True)
class Extraction:
    """What a protocol needs from the model: ``flip`` also embeds each image's horizontal
    mirror; ``unnormalized`` takes the embedding before the model's final L2 normalisation."""

    flip: bool = False
    unnormalized: bool = False


PLAIN = Extraction()
"""The model's output on the images as they are: what retrieval protocols measure."""


@dataclass
class Result:
    """A protocol's figures: ``metrics`` (floats, as MLflow logs them), ``record`` (written
    into metrics.json beside them: settings and where they came from), ``tags`` (MLflow run
    tags) and ``extras`` (for its files: curves, per-image inputs)."""

    metrics: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol (see the module doc for each step's contract)."""

    name: str
    check_config: Callable[[RunConfig, bool], None]
    preflight: Callable[[RunConfig, EvalSplit], list[str]]
    extraction: Callable[[EvalConfig], Extraction]
    compute: Callable[[Embeddings, DataConfig, EvalConfig, Any], Result]
    write: Callable[[Path, Embeddings, Result, DataConfig, EvalConfig], list[Path]]
    main_only: bool = False
    """``compute`` is plain single-process code: the evaluator runs it on rank 0 and gives
    every rank its result (otherwise every rank runs it, taking part in its collectives)."""


REGISTRY: dict[str, Protocol] = {}


def register(protocol: Protocol) -> Protocol:
    """Add ``protocol`` to the registry (its name must be new)."""
    if protocol.name in REGISTRY:
        raise ValueError(f"evaluation protocol {protocol.name!r} is registered twice")
    REGISTRY[protocol.name] = protocol
    return protocol


def get(name: str) -> Protocol:
    """The protocol ``eval.protocol`` names; a one-line ConfigError lists the others."""
    if name not in REGISTRY:
        raise ConfigError(
            f"eval.protocol={name!r}: no such evaluation protocol; use one of {', '.join(REGISTRY)}"
        )
    return REGISTRY[name]


def check_config(cfg: RunConfig) -> None:
    """Every protocol's config rules (the selected one's and the others'); the config rules
    call this when a config loads."""
    get(cfg.eval.protocol)
    for protocol in REGISTRY.values():
        protocol.check_config(cfg, protocol.name == cfg.eval.protocol)


def preflight(
    cfg: RunConfig,
    world_size: int,
    *,
    train: bool = True,
    evaluate: bool = True,
    global_batch: int | None = None,
) -> PreflightReport:
    """:func:`pipeline.preflight.preflight` (shards, P x K, world size: see there), then, with
    ``evaluate``, the selected protocol's checks of the eval split; a PreflightError names the
    first problem. Entry points call this one: it sits above both the generic checks and the
    registry."""
    report = preflight_shards(
        cfg, world_size, train=train, evaluate=evaluate, global_batch=global_batch
    )
    if report.eval_split is not None:
        report.lines.extend(get(cfg.eval.protocol).preflight(cfg, report.eval_split))
    return report


# ---------------------------------------------------------------------------- retrieval


def _no_config_rules(cfg: RunConfig, selected: bool) -> None:
    return None


def _vggface2_config(cfg: RunConfig, selected: bool) -> None:
    if selected and not cfg.eval.full_map:
        raise ConfigError(
            "eval.protocol=vggface2 with eval.full_map=false: VGGFace2's figure is the mAP over "
            "the full ranking; set eval.full_map=true (or eval.protocol=retrieval)"
        )


def _retrieval_preflight(cfg: RunConfig, split: EvalSplit) -> list[str]:
    counts = split.label_counts
    if split.indexed and (not counts or max(counts.values()) < 2):
        raise PreflightError(
            f"data.eval_urls={split.spec!r}: {sum(counts.values())} samples and no class with 2 "
            f"of them, so no query has a positive (eval.protocol={cfg.eval.protocol!r}); point "
            "data.eval_urls at the held-out split (e.g. data/synthetic/test)"
        )
    if split.indexed and len(counts) < 2:
        raise PreflightError(
            f"data.eval_urls={split.spec!r}: {sum(counts.values())} samples of one class, so "
            "every other item is a positive and recall and mAP are 1.0 whatever the model "
            f"(eval.protocol={cfg.eval.protocol!r}); point data.eval_urls at a split with several "
            "classes (e.g. data/synthetic/test)"
        )
    return []


def _retrieval_compute(e: Embeddings, data_cfg: DataConfig, ev: EvalConfig, device: Any) -> Result:
    # Preflight counts the classes of a split with a local catalog; a split read from an
    # object store or without a catalog is counted here, on the gathered labels (the same on
    # every rank, so every rank raises).
    classes = np.unique(e.labels_N)
    if len(classes) < 2:
        raise ProtocolDataError(
            f"data.eval_urls={data_cfg.eval_urls!r}: {len(e.labels_N)} samples of "
            f"{len(classes)} class, so every other item is a positive and recall and mAP are "
            f"1.0 whatever the model (eval.protocol={ev.protocol!r}); point data.eval_urls at a "
            "split with several classes (e.g. data/synthetic/test)"
        )
    # All ranks participate (sharded kNN, see pipeline.eval.metrics).
    metrics = retrieval_metrics(
        e.emb_ND,
        e.labels_N,
        ev.ks,
        full_map=ev.full_map,
        query_block=ev.query_block,
        device=device,
    )
    return Result(metrics)


def _retrieval_write(
    out: Path, e: Embeddings, result: Result, data_cfg: DataConfig, ev: EvalConfig
) -> list[Path]:
    grid = retrieval_grid(e.emb_ND, e.labels_N, e.row_N, data_cfg, EvalDir(out).retrieval_grid)
    return [] if grid is None else [grid]


def _plain_extraction(ev: EvalConfig) -> Extraction:
    return PLAIN


RETRIEVAL = register(
    Protocol(
        "retrieval",
        _no_config_rules,
        _retrieval_preflight,
        _plain_extraction,
        _retrieval_compute,
        _retrieval_write,
    )
)
VGGFACE2 = register(
    Protocol(
        "vggface2",
        _vggface2_config,
        _retrieval_preflight,
        _plain_extraction,
        _retrieval_compute,
        _retrieval_write,
    )
)


# ---------------------------------------------------------------------------- IJB-C / IJB-B

IJBC_LISTS = ("pairs.parquet", "ijbc_template_pair_label.txt", "ijbb_template_pair_label.txt")
"""Any of these marks a folder with the 1:1 list: make-shards' table, or the release's meta/."""
DET_SCORE = "det_score"
"""The catalog column with each face's detector score (null where the dataset gives none)."""


def ijbc_settings(ev: EvalConfig) -> IJBSettings:
    """The settings ``eval`` asks for (the detector score may turn out to be absent)."""
    return IJBSettings(
        flip=ev.ijbc_flip, norm_score=ev.ijbc_norm_score, det_score=ev.ijbc_det_score
    )


def _ijbc_config(cfg: RunConfig, selected: bool) -> None:
    ev, data = cfg.eval, cfg.data
    if ev.ijbc_protocol and not selected:
        raise ConfigError(
            f"eval.ijbc_protocol={ev.ijbc_protocol!r} is set but eval.protocol={ev.protocol!r} "
            "never reads it; set eval.protocol=ijbc or eval.ijbc_protocol=''"
        )
    if selected and not ev.ijbc_protocol and _is_remote(data.eval_urls):
        raise ConfigError(
            f"eval.protocol=ijbc with remote data.eval_urls={data.eval_urls!r}: the IJB-C pair "
            "lists and index.parquet are read from a local directory; copy the split's "
            "pairs.parquet and index.parquet locally and set eval.ijbc_protocol=DIR"
        )


def ijbc_lists_dir(data_cfg: DataConfig, ev: EvalConfig) -> Path:
    """The folder with the 1:1 and 1:N lists: eval.ijbc_protocol, else the eval split's."""
    return Path(ev.ijbc_protocol or split_dir(data_cfg.eval_urls))


def _ijbc_preflight(cfg: RunConfig, split: EvalSplit) -> list[str]:
    ev = cfg.eval
    folder = ijbc_lists_dir(cfg.data, ev)
    if not any((folder / n).is_file() for n in IJBC_LISTS):
        key = "eval.ijbc_protocol" if ev.ijbc_protocol else "data.eval_urls"
        raise PreflightError(
            f"eval.protocol=ijbc: {key} leads to {str(folder)!r}, which has neither "
            f"{IJBC_LISTS[0]} (written by make-shards beside IJB-C shards) nor {IJBC_LISTS[1]} "
            "(IJB-C's meta/ folder); set eval.ijbc_protocol to the folder that has one"
        )
    missing = {"template_id", "media_id"} - split.columns
    if split.indexed and missing:
        raise PreflightError(
            f"data.eval_urls={split.spec!r}: {INDEX_FILE} has no {sorted(missing)} column(s), "
            "which eval.protocol=ijbc needs; write the split with `pipeline make-shards ijbc`"
        )
    mode = ijbc_settings(ev).mode
    if ev.ijbc_det_score and split.indexed and DET_SCORE not in split.columns:
        return [
            f"eval.protocol=ijbc ({mode}): {INDEX_FILE} has no {DET_SCORE} column, so every "
            "detector-score weight is 1 (the metrics are named D0)"
        ]
    return []


def _ijbc_extraction(ev: EvalConfig) -> Extraction:
    # insightface's order: the flip features are added before any normalisation, so the
    # embedding is always taken before the model's own L2 normalisation.
    return Extraction(flip=ev.ijbc_flip, unnormalized=True)


def _catalog_columns(data_cfg: DataConfig, row_N: np.ndarray) -> dict[str, np.ndarray | None]:
    """Template id, media id and detector score (None: no such column, or all null) of each
    extracted sample, from the split's index.parquet."""
    table = read_index(data_cfg.eval_urls)
    missing = [c for c in ("template_id", "media_id") if c not in table.column_names]
    if missing:
        raise ProtocolDataError(
            f"data.eval_urls={data_cfg.eval_urls!r}: {INDEX_FILE} has no {missing} column; "
            "eval.protocol=ijbc needs shards written by `pipeline make-shards ijbc`"
        )
    if row_N.max() >= table.num_rows:
        raise ProtocolDataError(
            f"catalog row {int(row_N.max())} is beyond {INDEX_FILE} ({table.num_rows} rows): "
            "the shards and their index.parquet come from different make-shards runs"
        )
    out: dict[str, np.ndarray | None] = {
        c: np.asarray(table.column(c).to_numpy(zero_copy_only=False)[row_N], np.int64)
        for c in ("template_id", "media_id")
    }
    out[DET_SCORE] = None
    if DET_SCORE in table.column_names and table.column(DET_SCORE).null_count < table.num_rows:
        column = table.column(DET_SCORE)
        if column.null_count:
            raise ProtocolDataError(
                f"data.eval_urls={data_cfg.eval_urls!r}: {column.null_count} of {table.num_rows} "
                f"rows of {INDEX_FILE} have no {DET_SCORE}; weighting by detector score needs "
                "one per face: set eval.ijbc_det_score=false or rewrite the split"
            )
        scores = column.to_numpy(zero_copy_only=False).astype(np.float32)
        out[DET_SCORE] = scores[row_N]
    return out


def _ijbc_compute(e: Embeddings, data_cfg: DataConfig, ev: EvalConfig, device: Any) -> Result:
    # Plain NumPy on one process (main_only): pooling + 15.6M pairs take ~30 s on 2 cores.
    ids = _catalog_columns(data_cfg, e.row_N)
    det = ids[DET_SCORE]
    asked = ijbc_settings(ev)
    used = IJBSettings(asked.flip, asked.norm_score, asked.det_score and det is not None)
    lists = load_protocol(ijbc_lists_dir(data_cfg, ev))
    prefix = f"{lists.benchmark}_{used.mode}"
    if asked.det_score and det is None:
        log.warning(
            "eval.ijbc_det_score=true but %s has no %s column: every face weighs 1 (%s)",
            INDEX_FILE,
            DET_SCORE,
            used.mode,
        )
    feats = image_features(e.emb_ND, used, e.flip_ND, det)
    metrics, curve = ijbc_metrics(feats, ids["template_id"], ids["media_id"], lists, prefix=prefix)
    det_source = (
        f"catalog column {DET_SCORE}"
        if used.det_score
        else (
            f"none: {INDEX_FILE} has no {DET_SCORE} column, weight 1" if asked.det_score else "off"
        )
    )
    settings = {
        "benchmark": lists.benchmark,
        "mode": used.mode,
        "flip": used.flip,
        "norm_score": used.norm_score,
        "det_score": used.det_score,
        "det_score_source": det_source,
        "asked": {"flip": asked.flip, "norm_score": asked.norm_score, "det_score": asked.det_score},
        "order": "flip sum, then norm score or per-image L2, then detector score; media mean, "
        "template sum, L2, dot product",
        "features": {
            "original": "embeddings.npy",
            "mirrored": EvalDir(".").embeddings_flip.name if used.flip else None,
            "rows": "index.npy",
            "det_score": EvalDir(".").det_scores.name if used.det_score else None,
        },
    }
    tags = {
        "eval.ijbc.mode": used.mode,
        "eval.ijbc.benchmark": lists.benchmark,
        "eval.ijbc.det_score_source": det_source,
    }
    extras = {**curve, "prefix": prefix, DET_SCORE: det}
    return Result(metrics, {f"{prefix}_settings": settings}, tags, extras)


def _ijbc_write(
    out: Path, e: Embeddings, result: Result, data_cfg: DataConfig, ev: EvalConfig
) -> list[Path]:
    """The ROC curve (logged), and beside embeddings.npy / index.npy the mirrored faces'
    features and the detector scores that were pooled (not logged: large)."""
    if e.flip_ND is not None:
        np.save(EvalDir(out).embeddings_flip, e.flip_ND)
    det = result.extras.get(DET_SCORE)
    if det is not None:
        np.save(EvalDir(out).det_scores, det)
    prefix = result.extras["prefix"]
    tar = {
        float(k.split("=", 1)[1]): v
        for k, v in result.metrics.items()
        if k.startswith(f"{prefix}_tar@")
    }
    return [roc_png(result.extras["fpr"], result.extras["tpr"], tar, EvalDir(out).roc)]


IJBC = register(
    Protocol(
        "ijbc",
        _ijbc_config,
        _ijbc_preflight,
        _ijbc_extraction,
        _ijbc_compute,
        _ijbc_write,
        main_only=True,
    )
)
