"""IJB-C 1:1 TAR@FAR, both conventions, against brute-force float64 references written here:
the headline (largest TAR with FAR <= target) and insightface's (the ROC point nearest the
target)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from pipeline.eval.ijbc import tar_at_far, tar_at_far_nearest

FARS = (1e-4, 1e-3, 3e-3, 1e-2, 0.05, 0.1, 0.5)


def brute_roc(scores, labels):
    """One (fpr, tpr) per distinct score, accepting score >= t, highest t first; float64."""
    pos, neg = scores[labels], scores[~labels]
    points = []
    for t in sorted(set(scores.tolist()), reverse=True):
        points.append((float((neg >= t).sum()) / len(neg), float((pos >= t).sum()) / len(pos)))
    return points


def brute_strict(scores, labels, far):
    best = 0.0  # accepting nothing: FAR 0, TAR 0
    for fpr, tpr in brute_roc(scores, labels):
        if fpr <= far:
            best = max(best, tpr)
    return best


def brute_nearest(scores, labels, far):
    """insightface: sklearn's default ROC (origin + corner points), nearest FPR, ties to the
    larger TPR; written as loops over the count curve."""
    pos_n, neg_n = int(labels.sum()), int((~labels).sum())
    counts = [(round(f * neg_n), round(t * pos_n)) for f, t in brute_roc(scores, labels)]
    kept = []
    for i, (f, t) in enumerate(counts):
        if i in (0, len(counts) - 1):
            kept.append((f, t))
            continue
        (f0, t0), (f2, t2) = counts[i - 1], counts[i + 1]
        if (f2 - f) != (f - f0) or (t2 - t) != (t - t0):  # a bend, not a straight stretch
            kept.append((f, t))
    curve = [(0.0, 0.0)] + [(f / neg_n, t / pos_n) for f, t in kept]
    best_gap, best_tpr = None, None
    for fpr, tpr in curve:
        gap = abs(fpr - far)
        if best_gap is None or gap < best_gap or (gap == best_gap and tpr >= best_tpr):
            best_gap, best_tpr = gap, tpr
    return best_tpr


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    labels = rng.random(3000) < 0.2
    scores = np.round(rng.standard_normal(3000) + 1.5 * labels, 2)  # ties, as real scores have
    return scores, labels


def test_headline_is_the_largest_tar_within_the_far(data):
    scores, labels = data
    got = tar_at_far(scores, labels, FARS)
    for far in FARS:
        assert got[far] == pytest.approx(brute_strict(scores, labels, far), abs=1e-12), far


def test_nearest_is_insightfaces_convention(data):
    scores, labels = data
    got = tar_at_far_nearest(scores, labels, FARS)
    fpr, tpr, _ = roc_curve(labels, scores)  # sklearn's defaults, as insightface calls it
    for far in FARS:
        assert got[far] == pytest.approx(brute_nearest(scores, labels, far), abs=1e-12), far
        gap = np.abs(fpr - far)
        assert got[far] == pytest.approx(tpr[np.flatnonzero(gap == gap.min())[-1]], abs=1e-12)


def test_the_two_conventions_differ_where_the_nearest_point_is_above_the_far():
    # 10 impostors (FAR steps of 0.1), 4 genuine. Target FAR 0.09: the strict TAR stays at
    # FAR 0 (TAR 0.25); the nearest point is FAR 0.1, with TAR 1.
    scores = np.array([0.9, 0.8, 0.75, 0.7, 0.72, *np.linspace(0.6, 0.1, 9)])
    labels = np.array([1, 0, 1, 1, 1, *[0] * 9], bool)
    assert tar_at_far(scores, labels, [0.09])[0.09] == pytest.approx(0.25)
    assert tar_at_far_nearest(scores, labels, [0.09])[0.09] == pytest.approx(1.0)
    for far in (0.09, 0.3, 0.55):
        assert tar_at_far_nearest(scores, labels, [far])[far] == pytest.approx(
            brute_nearest(scores, labels, far)
        )
