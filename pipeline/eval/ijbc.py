"""IJB-C 1:1 verification and 1:N identification from image embeddings.

Template features (the protocol of the IJB-B/C papers and their public evaluation code): image
features are averaged within each media (a still, or the frames of one video) of a template,
the media features are summed over the template, and the sum is L2-normalised. A pair's score
is the cosine of its two templates.

* 1:1: TAR at FAR 1e-6 .. 1e-1 from the ROC over all pairs. The headline ``ijbc_tar@far=F``
  is the largest true accept rate among thresholds whose false accept rate is <= F
  (thresholds at the scores; a tie group is accepted or rejected as a whole, as in
  ``sklearn.metrics.roc_curve``): a rate the model is guaranteed at that FAR. insightface's
  IJB evaluation, which most papers' tables come from, instead reads the ROC point whose FAR
  is *nearest* F, on or above it, so its figures can be higher (and at FAR below 1/impostors
  are taken from a point far above F). It is reported too, clearly apart, as
  ``ijbc_tar_nearest@far=F`` (:func:`tar_at_far_nearest`); compare papers with that one.
* 1:N: each gallery (G1, G2) is searched by the mixed-media probes. A probe whose subject is
  enrolled is mated; its rank is 1 + the non-mate gallery templates scoring >= its mate.
  Rank-k identification rate: mated probes with rank <= k. TPIR at FPIR f: mated probes at rank
  1 whose mate score clears the lowest threshold that at most a fraction f of the non-mated
  probes' top scores clear. Reported per gallery and averaged over the galleries.

Shape legend: N images, D dims, T templates, P pairs, G gallery templates, Q probes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS: tuple[float, ...] = (1e-2, 1e-1)
RANKS: tuple[int, ...] = (1, 5)


@dataclass
class Gallery:
    """One 1:N gallery: its template ids and their subjects."""

    templates: np.ndarray
    subjects: np.ndarray


@dataclass
class IJBCProtocol:
    """The IJB-C test lists, as arrays of template / subject ids."""

    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_label: np.ndarray
    """1 for a genuine pair (same subject), 0 for an impostor pair."""
    galleries: dict[str, Gallery] = field(default_factory=dict)
    """'G1', 'G2' (1:N); empty skips identification."""
    probe_templates: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    probe_subjects: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


def _read_table(path: Path, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns of a whitespace- or comma-separated table (header lines are skipped)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"IJB-C protocol file {str(path)!r} is missing: set eval.ijbc_protocol to the shard "
            "split directory holding pairs.parquet (written by make-shards) or to IJB-C's meta/ "
            "folder (ijbc_template_pair_label.txt and the 1:N CSVs)"
        )
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts or not parts[0].lstrip("-").isdigit():
            continue  # a header or a blank line
        if len(parts) < len(columns):
            raise ValueError(
                f"{path}:{line_no}: expected {len(columns)} columns ({', '.join(columns)}), "
                f"got {line!r}"
            )
        rows.append([int(p) for p in parts[: len(columns)]])
    if not rows:
        raise ValueError(f"{path}: no data rows; is it the right IJB-C file?")
    table = np.asarray(rows, dtype=np.int64)
    return {c: table[:, j] for j, c in enumerate(columns)}


def _read_parquet(path: Path, columns: Sequence[str]) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: columns {missing} missing (has {table.column_names}); rewrite the IJB-C "
            "shards with `pipeline make-shards`"
        )
    return {c: table.column(c).to_numpy().astype(np.int64) for c in columns}


def load_protocol(protocol_dir: str | Path) -> IJBCProtocol:
    """The IJB-C lists from either of two folders:

    * a shard split directory: ``pairs.parquet`` (template1, template2, label) and, for 1:N,
      ``gallery_G1.parquet``, ``gallery_G2.parquet``, ``probe_mixed.parquet`` (template_id,
      subject_id), as ``pipeline make-shards`` writes them beside the IJB-C shards;
    * IJB-C's own ``meta/`` folder: ``ijbc_template_pair_label.txt`` and the CSVs
      ``ijbc_1N_gallery_G1.csv``, ``ijbc_1N_gallery_G2.csv``, ``ijbc_1N_probe_mixed.csv``.

    1:N is evaluated only when the probe list and both galleries are present.
    """
    root = Path(protocol_dir)
    if (root / "pairs.parquet").is_file():
        pairs = _read_parquet(root / "pairs.parquet", ("template1", "template2", "label"))
        protocol = IJBCProtocol(pairs["template1"], pairs["template2"], pairs["label"])
        lists = {n: root / f"{n}.parquet" for n in ("probe_mixed", "gallery_G1", "gallery_G2")}
        if all(p.is_file() for p in lists.values()):
            read = {n: _read_parquet(p, ("template_id", "subject_id")) for n, p in lists.items()}
            tables = {n: _unique_templates(t, lists[n]) for n, t in read.items()}
            protocol.probe_templates, protocol.probe_subjects = tables["probe_mixed"]
            for name in ("G1", "G2"):
                protocol.galleries[name] = Gallery(*tables[f"gallery_{name}"])
        return protocol
    pairs = _read_table(root / "ijbc_template_pair_label.txt", ("t1", "t2", "label"))
    protocol = IJBCProtocol(pairs["t1"], pairs["t2"], pairs["label"])
    csvs = {n: root / f"ijbc_1N_{n}.csv" for n in ("probe_mixed", "gallery_G1", "gallery_G2")}
    if all(p.is_file() for p in csvs.values()):
        tables = {
            n: _unique_templates(_read_table(p, ("template_id", "subject_id")), p)
            for n, p in csvs.items()
        }
        protocol.probe_templates, protocol.probe_subjects = tables["probe_mixed"]
        for name in ("G1", "G2"):
            protocol.galleries[name] = Gallery(*tables[f"gallery_{name}"])
    return protocol


def _unique_templates(table: dict[str, np.ndarray], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 1:N CSVs list one row per image; keep one (template, subject) per template."""
    t, first = np.unique(table["template_id"], return_index=True)
    s = table["subject_id"][first]
    pairs = np.unique(np.stack([table["template_id"], table["subject_id"]], 1), axis=0)
    if len(pairs) != len(t):
        raise ValueError(f"{path}: a template is listed with two different subjects")
    return t, s


def pool_templates(
    features_ND: np.ndarray,
    template_ids_M: np.ndarray,
    media_ids_M: np.ndarray,
    rows_M: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(template ids T, L2-normalised template features T x D): media means summed per template.

    One entry per template membership M: image ``rows_M[m]`` (default: m) is in template
    ``template_ids_M[m]`` as part of media ``media_ids_M[m]``, so an image may serve several
    templates. Media are grouped within a template.
    """
    feats = np.asarray(features_ND, dtype=np.float32)
    t_ids = np.asarray(template_ids_M).astype(np.int64)
    m_ids = np.asarray(media_ids_M).astype(np.int64)
    rows = np.arange(len(feats)) if rows_M is None else np.asarray(rows_M).astype(np.int64)
    if not (len(rows) == len(t_ids) == len(m_ids)):
        raise ValueError(
            f"IJB-C pooling: {len(rows)} images, {len(t_ids)} template ids and "
            f"{len(m_ids)} media ids; give one template and one media id per image"
        )
    if len(rows) == 0:
        raise ValueError("IJB-C pooling: no images; check the IJB-C eval shards")
    if rows.min() < 0 or rows.max() >= len(feats):
        raise ValueError(f"IJB-C pooling: image rows must lie in [0, {len(feats)})")
    if not np.isfinite(feats).all():
        raise ValueError("IJB-C pooling: features hold NaN or inf; check the model output")
    templates, t_code = np.unique(t_ids, return_inverse=True)
    pairs, group = np.unique(np.stack([t_code, m_ids], 1), axis=0, return_inverse=True)
    group = group.reshape(-1)
    n_groups = len(pairs)
    # index_add_ sums rows without sorting (copying) the N x D features.
    sums = torch.zeros(n_groups, feats.shape[1], dtype=torch.float32)
    src = torch.from_numpy(feats if rows_M is None else feats[rows])
    sums.index_add_(0, torch.from_numpy(group), src)
    counts = np.bincount(group, minlength=n_groups).astype(np.float32)
    sums /= torch.from_numpy(counts)[:, None]  # media means
    tmpl = torch.zeros(len(templates), feats.shape[1], dtype=torch.float32)
    tmpl.index_add_(0, torch.from_numpy(pairs[:, 0]), sums)
    tmpl = torch.nn.functional.normalize(tmpl, dim=1)
    return templates, tmpl.numpy()


def _rows_of(templates_T: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Row of each wanted template id in the sorted ``templates_T``; error on unknown ids."""
    rows = np.searchsorted(templates_T, wanted)
    rows = np.minimum(rows, len(templates_T) - 1)
    missing = templates_T[rows] != wanted
    if missing.any():
        ids = np.unique(np.asarray(wanted)[missing])
        raise ValueError(
            f"{what}: {ids.size} template id(s) have no image (first {ids[:5].tolist()}); "
            "the eval shards must hold every image of the IJB-C protocol"
        )
    return rows


def pair_scores(
    templates_T: np.ndarray,
    feats_TD: np.ndarray,
    t1_P: np.ndarray,
    t2_P: np.ndarray,
    block_bytes: int = 128 << 20,
) -> np.ndarray:
    """Cosine score of each template pair (features already L2-normalised).

    IJB-C scores 15.6M pairs among 23k templates, about 680 pairs per template. Gathering two
    feature rows per pair is memory-bound; instead pairs are grouped by their first template,
    and each group of first templates is scored against the second templates it meets with one
    matrix product, from which the pairs' entries are read (a product 30x larger than the pairs
    still runs ~10x faster than gathering rows on CPU). Where pairs are sparser than that
    (product > 64x the pairs), the rows are gathered.
    """
    r1 = _rows_of(templates_T, np.asarray(t1_P), "1:1 pairs")
    r2 = _rows_of(templates_T, np.asarray(t2_P), "1:1 pairs")
    f = torch.from_numpy(np.ascontiguousarray(feats_TD, dtype=np.float32))
    T = f.shape[0]
    out = np.empty(len(r1), dtype=np.float32)
    order = np.argsort(r1, kind="stable")
    rows_per_block = max(1, block_bytes // (4 * T))
    cuts = np.searchsorted(r1[order], np.arange(0, T + rows_per_block, rows_per_block))
    for a, b in itertools.pairwise(cuts):
        if a == b:
            continue
        sel = order[a:b]
        u1, i1 = np.unique(r1[sel], return_inverse=True)
        u2, i2 = np.unique(r2[sel], return_inverse=True)
        if len(u1) * len(u2) <= 64 * len(sel):
            sims = f[torch.from_numpy(u1)] @ f[torch.from_numpy(u2)].T
            out[sel] = sims.numpy()[i1.reshape(-1), i2.reshape(-1)]
        else:
            fn = f.numpy()
            for c in range(0, len(sel), 1 << 16):
                part = sel[c : c + (1 << 16)]
                out[part] = np.einsum("ij,ij->i", fn[r1[part]], fn[r2[part]])
    return out


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score from the highest, as
    ``sklearn.metrics.roc_curve(drop_intermediate=False)`` without its extra (0, 0) point."""
    fp, tp, thresholds = _roc_counts(scores, labels)
    return fp / fp[-1], tp / tp[-1], thresholds


def _roc_counts(
    scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false accepts, true accepts, threshold) at each distinct score, from the highest; the
    last point accepts everything, so its counts are the impostor and genuine totals."""
    scores = np.asarray(scores)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"ROC needs genuine and impostor scores; got {n_pos} genuine and {n_neg} impostor"
        )
    # Order within a tie group does not matter: only its last position is read.
    order = np.argsort(scores)[::-1]
    s = scores[order]
    tp = np.cumsum(labels[order])
    last_of_tie = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tp = tp[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return fp, tp, s[last_of_tie]


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = FARS
) -> dict[float, float]:
    """TAR at each FAR: the largest TPR among ROC points with FPR <= FAR (0 if none)."""
    fpr, tpr, _ = roc_points(scores, labels)
    return {far: _max_tpr_at(fpr, tpr, far) for far in fars}


def tar_at_far_nearest(
    scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = FARS
) -> dict[float, float]:
    """TAR at each FAR by insightface's IJB convention (not the headline, see the module doc):
    the ROC of ``sklearn.metrics.roc_curve`` with its defaults (the origin, then only the
    corners: points where the curve changes direction), and at each FAR the point whose FPR
    is nearest it; of equally near points, the one with the larger TPR. Its FPR may exceed
    the FAR."""
    fp, tp, _ = _roc_counts(scores, labels)
    # Keep the first, the last and every point where the step in fp or tp changes.
    bends = np.flatnonzero((np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0)) + 1
    keep = np.unique(np.r_[0, bends, len(fp) - 1])
    fpr = np.r_[0.0, fp[keep] / fp[-1]]
    tpr = np.r_[0.0, tp[keep] / tp[-1]]
    out = {}
    for far in fars:
        gap = np.abs(fpr - far)
        # fpr and tpr never decrease: the last of the nearest points has the largest TPR.
        out[far] = float(tpr[np.flatnonzero(gap == gap.min())[-1]])
    return out


def _max_tpr_at(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    # fpr and tpr never decrease along the curve: the last point with fpr <= far is the best.
    n = int(np.searchsorted(fpr, far, side="right"))
    return float(tpr[n - 1]) if n > 0 else 0.0


def identification(
    probe_feats_QD: np.ndarray,
    probe_subjects_Q: np.ndarray,
    gallery_feats_GD: np.ndarray,
    gallery_subjects_G: np.ndarray,
    ranks: Sequence[int] = RANKS,
    fpirs: Sequence[float] = FPIRS,
    block: int = 4096,
) -> dict[str, float]:
    """Open-set 1:N search of one gallery: rank-k identification rates and TPIR at FPIR.

    Probe x gallery scores are computed in blocks of probes (the gallery is small in 1:N).
    """
    q_subj = np.asarray(probe_subjects_Q)
    g_subj = np.asarray(gallery_subjects_G)
    mated = np.isin(q_subj, g_subj)
    if not mated.any() or mated.all():
        raise ValueError(
            f"1:N: {int(mated.sum())} of {len(q_subj)} probes are mated; open-set "
            "identification needs both mated and non-mated probes (check the gallery/probe lists)"
        )
    g = np.ascontiguousarray(gallery_feats_GD, dtype=np.float32)
    mate_score = np.full(len(q_subj), -np.inf)
    rank = np.zeros(len(q_subj), dtype=np.int64)
    top = np.empty(len(q_subj))
    for a in range(0, len(q_subj), block):
        s = np.asarray(probe_feats_QD[a : a + block], dtype=np.float32) @ g.T
        is_mate = q_subj[a : a + block, None] == g_subj[None, :]
        ms = np.where(is_mate, s, -np.inf).max(1)
        mate_score[a : a + block] = ms
        rank[a : a + block] = 1 + (np.where(is_mate, -np.inf, s) >= ms[:, None]).sum(1)
        top[a : a + block] = s.max(1)
    out = {f"rank{k}": float((rank[mated] <= k).mean()) for k in ranks}
    # Thresholds at the non-mated top scores: at t, the alarms are the non-mated probes >= t
    # and the hits the mated probes at rank 1 with a mate score >= t.
    hit = mated & (rank == 1)
    scores = np.r_[mate_score[hit], top[~mated]]
    labels = np.r_[np.ones(int(hit.sum()), bool), np.zeros(int((~mated).sum()), bool)]
    fpr, tpr, _ = roc_points(scores, labels)
    tpr = tpr * hit.sum() / mated.sum()  # mated probes not at rank 1 are never hits
    for f in fpirs:
        out[f"tpir@fpir={f:g}"] = _max_tpr_at(fpr, tpr, f)
    return out


def ijbc_metrics(
    features_ND: np.ndarray,
    template_ids_M: np.ndarray,
    media_ids_M: np.ndarray,
    protocol: IJBCProtocol,
    rows_M: np.ndarray | None = None,
    fars: Sequence[float] = FARS,
) -> tuple[dict[str, float], dict[str, Any]]:
    """All IJB-C figures, and the ROC curve (for the plot).

    Keys: ``ijbc_tar@far={far:g}`` (headline: largest TAR with FAR <= far),
    ``ijbc_tar_nearest@far={far:g}`` (insightface's nearest-FAR point); with 1:N galleries ``ijbc_1n_{G}_rank{k}``,
    ``ijbc_1n_{G}_tpir@fpir={f:g}`` and their mean over galleries ``ijbc_1n_rank{k}`` ...
    """
    templates, feats = pool_templates(features_ND, template_ids_M, media_ids_M, rows_M)
    scores = pair_scores(templates, feats, protocol.pair_t1, protocol.pair_t2)
    fpr, tpr, thr = roc_points(scores, protocol.pair_label)
    out = {f"ijbc_tar@far={far:g}": _max_tpr_at(fpr, tpr, far) for far in fars}
    # insightface's convention, for comparison with published tables (module doc).
    nearest = tar_at_far_nearest(scores, protocol.pair_label, fars)
    out.update({f"ijbc_tar_nearest@far={far:g}": v for far, v in nearest.items()})
    per_gallery = []
    for name, gal in protocol.galleries.items():
        g_rows = _rows_of(templates, gal.templates, f"1:N gallery {name}")
        q_rows = _rows_of(templates, protocol.probe_templates, "1:N probes")
        r = identification(feats[q_rows], protocol.probe_subjects, feats[g_rows], gal.subjects)
        out.update({f"ijbc_1n_{name}_{k}": v for k, v in r.items()})
        per_gallery.append(r)
    for key in per_gallery[0] if per_gallery else []:
        out[f"ijbc_1n_{key}"] = float(np.mean([r[key] for r in per_gallery]))
    out["ijbc_num_templates"] = float(len(templates))
    out["ijbc_num_pairs"] = float(len(scores))
    return out, {"fpr": fpr, "tpr": tpr, "thresholds": thr}
