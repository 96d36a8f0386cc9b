"""IJB-C pooling, TAR@FAR and 1:N identification against hand-computed answers and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from pipeline.eval.ijbc import (
    Gallery,
    IJBCProtocol,
    identification,
    ijbc_metrics,
    load_protocol,
    pair_scores,
    pool_templates,
    tar_at_far,
)


def test_pooling_averages_media_then_sums_templates():
    # Template 7: media 1 = two images (mean [1, 0.5]), media 2 = one image [0, 1] -> sum [1, 1.5].
    # Template 3: one media of one image [3, 4] -> [0.6, 0.8]. Media 1 also appears in template 3
    # (grouping is within a template).
    feats = np.array([[1, 0], [1, 1], [0, 1], [3, 4]], np.float32)
    templates, tf = pool_templates(feats, [7, 7, 7, 3], [1, 1, 2, 1])
    np.testing.assert_array_equal(templates, [3, 7])
    np.testing.assert_allclose(tf[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(tf[1], np.array([1, 1.5]) / np.hypot(1, 1.5), rtol=1e-6)
    # The same through memberships: image 3 is also in template 9.
    t2, tf2 = pool_templates(feats, [7, 7, 7, 3, 9], [1, 1, 2, 1, 5], rows_M=[0, 1, 2, 3, 3])
    np.testing.assert_array_equal(t2, [3, 7, 9])
    np.testing.assert_allclose(tf2[2], [0.6, 0.8], rtol=1e-6)


# 1000 pairs among ~290 x 290 templates in one block: sparse, rows gathered; 20000 pairs in
# blocks of 64 first templates: dense, one product per block.
@pytest.mark.parametrize(("n_pairs", "block_bytes"), [(1000, 1 << 20), (20_000, 4 * 300 * 64)])
def test_pair_scores_are_the_template_cosines(n_pairs, block_bytes):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((300, 16)).astype(np.float32)
    templates = np.arange(300) * 7 + 3
    t1, t2 = templates[rng.integers(0, 300, (2, n_pairs))]
    got = pair_scores(templates, feats, t1, t2, block_bytes=block_bytes)
    f64 = feats.astype(np.float64)
    want = [f64[(a - 3) // 7] @ f64[(b - 3) // 7] for a, b in zip(t1, t2)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _sklearn_tar(scores, labels, far):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    ok = fpr <= far
    return float(tpr[ok].max()) if ok.any() else 0.0


def test_tar_at_far_matches_sklearn_roc_curve_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(20_000) < 0.1
    scores = np.round(rng.standard_normal(20_000) + 2 * labels, 2)  # rounding makes ties
    fars = (1e-4, 1e-3, 1e-2, 1e-1, 0.5)
    got = tar_at_far(scores, labels, fars)
    for far in fars:
        assert got[far] == pytest.approx(_sklearn_tar(scores, labels, far), abs=1e-15), far


def _identification_reference(q, q_subj, g, g_subj, ranks, fpirs):
    """Loop per probe, float64; threshold search over every candidate score."""
    s = q.astype(np.float64) @ g.T.astype(np.float64)
    mated = [bool((g_subj == x).any()) for x in q_subj]
    info = []
    for i in range(len(q)):
        if mated[i]:
            ms = max(s[i, j] for j in range(len(g)) if g_subj[j] == q_subj[i])
            r = 1 + sum(1 for j in range(len(g)) if g_subj[j] != q_subj[i] and s[i, j] >= ms)
            info.append((True, r, ms))
        else:
            info.append((False, None, s[i].max()))
    n_m = sum(mated)
    nm_top = [t for m, _, t in info if not m]
    out = {f"rank{k}": sum(1 for m, r, _ in info if m and r <= k) / n_m for k in ranks}
    for f in fpirs:
        best = 0.0
        for t in sorted({x for _, _, x in info} | {np.inf}):
            fpir = sum(1 for x in nm_top if x >= t) / len(nm_top)
            if fpir <= f:
                best = max(best, sum(1 for m, r, x in info if m and r == 1 and x >= t) / n_m)
        out[f"tpir@fpir={f:g}"] = best
    out.update(_insightface_tpir_reference(s, q_subj, g_subj, fpirs))
    return out


def _insightface_tpir_reference(s, q_subj, g_subj, fpirs):
    """insightface's 1:N rule by brute force: threshold = the non-mated probes' top scores,
    high to low, at position max(int(N x f) - 1, 0); a mated probe counts when its mate beats
    every other gallery template and the threshold (both strictly)."""
    non_mated_tops, mated = [], []
    for i in range(len(q_subj)):
        mates = [s[i, j] for j in range(len(g_subj)) if g_subj[j] == q_subj[i]]
        others = [s[i, j] for j in range(len(g_subj)) if g_subj[j] != q_subj[i]]
        if mates:
            mated.append((max(mates), max(others, default=-np.inf)))
        else:
            non_mated_tops.append(max(others))
    ranked = sorted(non_mated_tops, reverse=True)
    out = {}
    for f in fpirs:
        threshold = ranked[max(int(len(ranked) * f) - 1, 0)]
        hits = sum(1 for mate, other in mated if mate > other and mate > threshold)
        out[f"tpir_insightface@fpir={f:g}"] = hits / len(mated)
    return out


def test_identification_matches_a_loop_reference():
    rng = np.random.default_rng(1)
    g_subj = np.arange(30)
    centers = rng.standard_normal((40, 8))
    g = centers[:30] + 0.8 * rng.standard_normal((30, 8))
    q_subj = rng.integers(0, 40, 300)  # subjects 30..39 are not enrolled: non-mated probes
    q = centers[q_subj] + 0.8 * rng.standard_normal((300, 8))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    ranks, fpirs = (1, 5), (0.01, 0.1, 0.3)
    got = identification(q, q_subj, g, g_subj, ranks, fpirs, block=64)
    want = _identification_reference(q, q_subj, g, g_subj, ranks, fpirs)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def _write_protocol(root, pairs, galleries, probes):
    (root / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {c}\n" for a, b, c in pairs)
    )
    for name, rows in galleries.items():
        (root / f"ijbc_1N_gallery_{name}.csv").write_text(
            "TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "".join(f"{t},{s},img/{t}.jpg\n" for t, s in rows)
        )
    (root / "ijbc_1N_probe_mixed.csv").write_text(
        "TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "".join(f"{t},{s},img/x.jpg\n" for t, s in probes)
    )


def test_small_synthetic_protocol_with_a_known_answer(tmp_path):
    # Subjects 0..3 have orthogonal directions e_0..e_3. Templates 10+s hold two media of
    # subject s (pure e_s); template 20 is subject 0 but one media points at e_1.
    eye = np.eye(4, dtype=np.float32)
    feats, tids, mids = [], [], []
    for s in range(4):
        for m in range(2):
            feats += [eye[s], eye[s]]
            tids += [10 + s, 10 + s]
            mids += [100 * s + m] * 2
    feats += [eye[0], eye[1]]
    tids += [20, 20]
    mids += [900, 901]  # template 20 = (e_0 + e_1) / sqrt 2
    pairs = [(10, 11, 0), (10, 12, 0), (11, 13, 0), (12, 13, 0), (10, 20, 1), (11, 20, 0)]
    _write_protocol(
        tmp_path,
        pairs,
        {"G1": [(10, 0), (11, 1)], "G2": [(12, 2), (13, 3)]},
        [(20, 0), (12, 2), (13, 3), (11, 1)],
    )
    protocol = load_protocol(tmp_path)
    out, roc = ijbc_metrics(
        np.stack(feats), np.array(tids), np.array(mids), protocol, fars=(0.1, 0.2)
    )
    # Genuine pair (10, 20) scores 1/sqrt 2, tied with the impostor (11, 20); the 4 other
    # impostors score 0. The tie group is accepted or rejected as a whole: FAR 1/5 -> TAR 1,
    # below it TAR 0.
    assert out["ijbc_tar@far=0.1"] == 0.0
    assert out["ijbc_tar@far=0.2"] == 1.0
    np.testing.assert_allclose(roc["fpr"], [0.2, 1.0])
    np.testing.assert_allclose(roc["thresholds"], [np.sqrt(0.5), 0.0], atol=1e-6)
    # G1 = {10: s0, 11: s1}: probe 20 (s0) ties its mate 10 with non-mate 11 -> rank 2; probe
    # 11 (s1) is rank 1; probes 12, 13 are non-mated with top score 0.
    assert out["ijbc_1n_G1_rank1"] == 0.5
    assert out["ijbc_1n_G1_rank5"] == 1.0
    # G2 = {12: s2, 13: s3}: probes 12, 13 rank 1 with score 1; non-mated 20, 11 top score 0.
    assert out["ijbc_1n_G2_rank1"] == 1.0
    assert out["ijbc_1n_G2_tpir@fpir=0.01"] == 1.0
    # G1 at FPIR 0.01: the threshold must exceed the non-mated top score 0; probe 11 scores 1.
    assert out["ijbc_1n_G1_tpir@fpir=0.01"] == 0.5
    assert out["ijbc_1n_rank1"] == pytest.approx(0.75)
    assert out["ijbc_num_templates"] == 5


def test_bad_protocol_input_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ijbc_template_pair_label.txt' is missing"):
        load_protocol(tmp_path)
    (tmp_path / "ijbc_template_pair_label.txt").write_text("1 2\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label.txt:1: expected 3 columns"):
        load_protocol(tmp_path)
    protocol = IJBCProtocol(np.array([1]), np.array([99]), np.array([1]))
    feats = np.eye(2, dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"1:1 pairs: 1 template id\(s\) have no image \(first \[99\]\)"
    ):
        ijbc_metrics(feats, np.array([1, 2]), np.array([0, 0]), protocol)
    with pytest.raises(ValueError, match="give one template and one media id per image"):
        pool_templates(feats, [1], [0, 0])
    with pytest.raises(ValueError, match="needs both mated and non-mated probes"):
        identification(feats, np.array([0, 1]), feats, np.array([0, 1]))
    protocol = IJBCProtocol(
        np.array([1, 1]),
        np.array([2, 1]),
        np.array([0, 1]),
        galleries={"G1": Gallery(np.array([1, 5]), np.array([0, 1]))},
        probe_templates=np.array([2]),
        probe_subjects=np.array([0]),
    )
    with pytest.raises(ValueError, match=r"1:N gallery G1: 1 template id\(s\) have no image"):
        ijbc_metrics(feats, np.array([1, 2]), np.array([0, 0]), protocol)


def test_parquet_lists_from_make_shards_read_like_the_ijbc_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [(10, 11, 0), (10, 20, 1)]
    galleries = {"G1": [(10, 0)], "G2": [(12, 2)]}
    probes = [(20, 0), (11, 1)]
    (tmp_path / "meta").mkdir()
    _write_protocol(tmp_path / "meta", pairs, galleries, probes)
    split = tmp_path / "split"
    split.mkdir()
    cols = list(zip(*pairs))
    pq.write_table(
        pa.table({"template1": cols[0], "template2": cols[1], "label": cols[2]}),
        split / "pairs.parquet",
    )
    for name, rows in [("probe_mixed", probes)] + [
        (f"gallery_{g}", r) for g, r in galleries.items()
    ]:
        t, s = zip(*rows)
        pq.write_table(pa.table({"template_id": t, "subject_id": s}), split / f"{name}.parquet")
    a, b = load_protocol(tmp_path / "meta"), load_protocol(split)
    for field in ("pair_t1", "pair_t2", "pair_label", "probe_templates", "probe_subjects"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.galleries.keys() == b.galleries.keys() == {"G1", "G2"}
    for g in a.galleries:
        np.testing.assert_array_equal(a.galleries[g].templates, b.galleries[g].templates)
        np.testing.assert_array_equal(a.galleries[g].subjects, b.galleries[g].subjects)
