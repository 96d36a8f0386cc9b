"""Retrieval metrics against references written here: a float64 loop and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from pipeline.eval.metrics import DEFAULT_KS, retrieval_metrics


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _textbook(emb: np.ndarray, labels: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Sort every other item by float64 score (no ties in the data); P@i, rel_i as in the paper."""
    s = emb.astype(np.float64) @ emb.T.astype(np.float64)
    acc: dict[str, list[float]] = {}
    skipped = 0
    for q in range(len(emb)):
        others = np.array([j for j in range(len(emb)) if j != q])
        order = others[np.argsort(-s[q, others], kind="stable")]
        rel = labels[order] == labels[q]
        R = int(rel.sum())
        if R == 0:
            skipped += 1
            continue
        prec_at_i = np.cumsum(rel) / np.arange(1, len(order) + 1)
        acc.setdefault("map@r", []).append(float((prec_at_i[:R] * rel[:R]).sum() / R))
        acc.setdefault("r_precision", []).append(float(rel[:R].sum() / R))
        acc.setdefault("map", []).append(float(average_precision_score(rel, s[q, order])))
        for k in ks:
            acc.setdefault(f"recall@{k}", []).append(float(rel[:k].any()))
    out = {key: float(np.mean(v)) for key, v in acc.items()}
    out["num_queries_without_positive"] = float(skipped)
    return out


def _pessimistic(emb: np.ndarray, labels: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Loop-by-loop float64 reference with the tie rule: tied items rank before a positive."""
    s = emb.astype(np.float64) @ emb.T.astype(np.float64)
    acc: dict[str, list[float]] = {}
    for q in range(len(emb)):
        pos = [j for j in range(len(emb)) if j != q and labels[j] == labels[q]]
        if not pos:
            continue
        R = len(pos)
        rank = {p: sum(1 for j in range(len(emb)) if j != q and s[q, j] >= s[q, p]) for p in pos}
        hits = {p: sum(1 for o in pos if s[q, o] >= s[q, p]) for p in pos}
        acc.setdefault("map", []).append(sum(hits[p] / rank[p] for p in pos) / R)
        acc.setdefault("map@r", []).append(sum(hits[p] / rank[p] for p in pos if rank[p] <= R) / R)
        acc.setdefault("r_precision", []).append(sum(1 for p in pos if rank[p] <= R) / R)
        for k in ks:
            acc.setdefault(f"recall@{k}", []).append(float(min(rank.values()) <= k))
    return {key: float(np.mean(v)) for key, v in acc.items()}


def test_matches_textbook_definitions_and_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    emb = _unit(rng.standard_normal((300, 12)))
    labels = rng.integers(0, 40, 300)
    labels[:3] = [1000, 1001, 1002]  # three queries with no positive: left out and counted
    ks = [1, 2, 8, 30]
    got = retrieval_metrics(emb, labels, ks, query_block=37, map_block_bytes=20_000)
    want = _textbook(emb, labels, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["num_queries"] == 297


def test_ties_follow_the_pessimistic_rule_whatever_faiss_returns():
    # Small integer vectors: every score is exact in float32 and float64, and most tie.
    rng = np.random.default_rng(1)
    emb = rng.integers(-1, 2, size=(160, 3)).astype(np.float32)
    emb[np.abs(emb).sum(1) == 0, 0] = 1  # no zero rows
    labels = rng.integers(0, 12, 160)
    ks = [1, 3, 10, 25]
    got = retrieval_metrics(emb, labels, ks, normalize=False, query_block=23)
    want = _pessimistic(emb, labels, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_self_match_is_removed_by_index_not_by_position():
    # Items 0 and 1 are identical but differently labelled. Dropping the first neighbour would
    # keep item 0 itself (or drop 1) depending on FAISS's tie order; removing by index ranks the
    # duplicate 1 first for query 0.
    emb = np.array([[1, 0], [1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 7])
    got = retrieval_metrics(emb, labels, [1, 2])
    # query 0: 1 (neg, duplicate), 2 (pos) -> recall@1 0, recall@2 1, AP 1/2
    # query 1: 0 (neg, duplicate), 2, 4, then 3 (pos, rank 4) -> recall@2 0, AP 1/4
    # query 2: 4 (0.96), then {0, 1} tied at 0.8: positive 0 ranks 3 (ties count before it)
    # query 3: 4, 2, then {0, 1} tied at 0: positive 1 ranks 4 -> AP 1/4
    # query 4 has no positive: left out.
    assert got["recall@1"] == 0.0
    assert got["recall@2"] == pytest.approx(1 / 4)
    assert got["map"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 3 + 1 / 4) / 4)
    assert got["map@r"] == pytest.approx((0 + 0 + 0 + 0) / 4)
    assert got["num_queries_without_positive"] == 1


def test_cutoffs_beyond_the_gallery_and_large_classes():
    rng = np.random.default_rng(2)
    emb = _unit(rng.standard_normal((40, 5)))
    labels = np.repeat([0, 1], 20)  # R = 19: the lists span the whole gallery
    ks = [1, 39, 500]
    got = retrieval_metrics(emb, labels, ks)
    want = _textbook(emb, labels, ks)
    for key in ("map@r", "map", "r_precision", "recall@1", "recall@39"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["recall@500"] == 1.0


def test_map_does_not_depend_on_the_block_size():
    rng = np.random.default_rng(3)
    emb = _unit(rng.standard_normal((200, 6)))
    labels = rng.integers(0, 9, 200)
    a = retrieval_metrics(emb, labels, [1], map_block_bytes=1)  # one query per block
    b = retrieval_metrics(emb, labels, [1], map_block_bytes=1 << 30)  # all at once
    assert a == b


def test_default_ks_are_the_papers():
    assert DEFAULT_KS["sop"] == (1, 10, 100, 1000)
    assert DEFAULT_KS["inaturalist"] == (1, 4, 16, 32)
    assert DEFAULT_KS["vehicleid"] == (1, 5)


def test_bad_input_is_refused_with_a_clear_message():
    emb = _unit(np.random.default_rng(4).standard_normal((10, 4)))
    labels = np.arange(10) % 3
    with pytest.raises(ValueError, match="gallery is empty"):
        retrieval_metrics(emb[:1], labels[:1])
    with pytest.raises(ValueError, match="10 rows but labels has 9"):
        retrieval_metrics(emb, labels[:9])
    bad = emb.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(first rows \[4\]\)"):
        retrieval_metrics(bad, labels)
    zero = emb.copy()
    zero[7] = 0
    with pytest.raises(ValueError, match=r"all-zero row\(s\) \(first \[7\]\)"):
        retrieval_metrics(zero, labels)
    with pytest.raises(ValueError, match="every label occurs once"):
        retrieval_metrics(emb, np.arange(10))
    with pytest.raises(ValueError, match="positive cut-offs"):
        retrieval_metrics(emb, labels, [0, 5])
    with pytest.raises(ValueError, match="2-d array"):
        retrieval_metrics(emb[0], labels)


@pytest.mark.parametrize("passes_max", [0, 1000])  # batched binary search / compare passes
def test_both_counting_methods_give_the_same_ties(monkeypatch, passes_max):
    import pipeline.eval.metrics as metrics_mod

    monkeypatch.setattr(metrics_mod, "COMPARE_PASSES_MAX", passes_max)
    rng = np.random.default_rng(5)
    emb = rng.integers(-1, 2, size=(120, 3)).astype(np.float32)
    emb[np.abs(emb).sum(1) == 0, 0] = 1
    labels = rng.integers(0, 7, 120)
    got = metrics_mod.retrieval_metrics(emb, labels, [1], normalize=False, map_block_bytes=9000)
    assert got["map"] == pytest.approx(_pessimistic(emb, labels, [1])["map"], abs=1e-12)
