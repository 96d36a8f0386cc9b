"""Exact FAISS kNN: sharded search and the cross-rank merge equal one flat index / brute force."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest

from pipeline.eval import knn
from pipeline.eval.knn import ExactIPIndex, gallery_slice, knn_search, merge_topk
from tests.dist_helpers import run_distributed


def _data(n: int = 1000, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_force(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores, sorted by score then id (the data here has no exact ties)."""
    s = q.astype(np.float64) @ g.T.astype(np.float64)
    order = np.lexsort((np.broadcast_to(np.arange(g.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def _assert_matches_brute_force(scores, ids, q, g, k):
    ref_s, _ = _brute_force(q, g, k)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    # The returned ids carry exactly the returned scores (float32 vs float64: ids may swap only
    # between items whose scores differ by less than the rounding).
    s64 = q.astype(np.float64) @ g.T.astype(np.float64)
    np.testing.assert_allclose(np.take_along_axis(s64, ids, 1), ref_s, atol=1e-5)
    assert all(len(set(row)) == k for row in ids.tolist())


def test_flat_index_matches_brute_force():
    g = _data()
    s, i = ExactIPIndex(g).search(g[:100], 25)
    _assert_matches_brute_force(s, i, g[:100], g, 25)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_index_shards_equal_the_flat_index(shards):
    g = _data(1001)  # 1001 rows: uneven shards
    q = g[::7]
    flat = ExactIPIndex(g).search(q, 40)
    sharded = ExactIPIndex(g, cpu_shards=shards).search(q, 40)
    np.testing.assert_array_equal(flat[0], sharded[0])
    np.testing.assert_array_equal(flat[1], sharded[1])


@pytest.mark.parametrize(
    "bounds", [[0, 1001], [0, 500, 1001], [0, 10, 600, 1001], [0, 0, 30, 31, 1001]]
)
def test_merged_gallery_slices_equal_one_index(bounds):
    # Uneven slices, an empty one, and slices smaller than k (padded with -inf / -1).
    g = _data(1001)
    q = g[::5]
    k = 50
    flat_s, flat_i = ExactIPIndex(g).search(q, k)
    parts = [ExactIPIndex(g[lo:hi], lo).search(q, k) for lo, hi in itertools.pairwise(bounds)]
    s, i = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
    np.testing.assert_array_equal(s, flat_s)
    np.testing.assert_array_equal(i, flat_i)


def test_merge_keeps_the_largest_and_orders_ties_by_id():
    s1 = np.array([[0.9, 0.5, -np.inf]], np.float32)
    i1 = np.array([[7, 3, -1]])
    s2 = np.array([[0.5, 0.5, 0.4]], np.float32)
    i2 = np.array([[9, 1, 2]])
    s, i = merge_topk([s1, s2], [i1, i2], 4)
    np.testing.assert_array_equal(i, [[7, 1, 3, 9]])
    np.testing.assert_array_equal(s, np.array([[0.9, 0.5, 0.5, 0.5]], np.float32))


def test_k_beyond_the_gallery_is_padded():
    g = _data(5, 4)
    s, i = ExactIPIndex(g, 100).search(g[:2], 8)
    assert (i[:, :5] >= 100).all() and (i[:, 5:] == -1).all()
    assert np.isneginf(s[:, 5:]).all() and np.isfinite(s[:, :5]).all()


def test_exact_torch_search_for_k_beyond_the_gpu_limit():
    # The path GPUs take when k > GPU_MAX_K (FAISS's cap), run here on the CPU.
    g = _data(2600, 8, seed=1)
    q = g[:30]
    k = knn.GPU_MAX_K + 300
    index = ExactIPIndex(g[:1300], 0)
    s, i = index._search_torch(q, k)
    assert s.shape == (30, k)
    # The whole 1300-row slice comes back (padded), then a second slice merges in.
    other = ExactIPIndex(g[1300:], 1300)._search_torch(q, k)
    s, i = merge_topk([s, other[0]], [i, other[1]], k)
    _assert_matches_brute_force(s, i, q, g, k)


def test_gallery_slices_cover_every_row_once():
    for n, world in [(10, 3), (2, 4), (1001, 2), (0, 2)]:
        rows = [r for rank in range(world) for r in range(*gallery_slice(n, rank, world))]
        assert rows == list(range(n))


def test_bad_input_is_refused():
    g = _data(20, 4)
    index = ExactIPIndex(g)
    with pytest.raises(ValueError, match="queries have 3 dims but the gallery has 4"):
        index.search(g[:, :3], 2)
    with pytest.raises(ValueError, match="k=0: must be >= 1"):
        index.search(g, 0)
    bad = g.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"gallery: 1 row\(s\) hold NaN or inf"):
        ExactIPIndex(bad)


def test_missing_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ImportError, match=r"pip install -e '\.\[cpu\]'"):
        knn.import_faiss()


@pytest.mark.gpu
def test_gpu_index_shards_equal_the_cpu_index():
    if knn.num_faiss_gpus() == 0:
        pytest.skip("faiss has no GPU here")
    g = _data(5000)
    q = g[:200]
    cpu = ExactIPIndex(g).search(q, 100)
    gpu = ExactIPIndex(g, gpus=list(range(knn.num_faiss_gpus()))).search(q, 100)
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-5)
    big = ExactIPIndex(g, gpus=[0]).search(q, knn.GPU_MAX_K + 1)
    _assert_matches_brute_force(big[0], big[1], q, g, knn.GPU_MAX_K + 1)


# ------------------------------------------------------------------ 2 real gloo processes


def _two_rank_job(rank: int, world_size: int, out_dir: str) -> None:
    from pipeline.eval.metrics import retrieval_metrics

    g = _data(777, 8, seed=5)  # 777 rows: the ranks' gallery slices differ in size
    labels = np.random.default_rng(6).integers(0, 60, 777)
    s, i = knn_search(g, g, 30, query_block=100)
    m = retrieval_metrics(g, labels, [1, 5, 20], query_block=100, map_block_bytes=100_000)
    np.savez(f"{out_dir}/rank{rank}.npz", s=s, i=i, m=np.array(sorted(m.items()), dtype=object))


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(tmp_path):
    from pipeline.eval.metrics import retrieval_metrics

    run_distributed(_two_rank_job, 2, str(tmp_path))
    g = _data(777, 8, seed=5)
    labels = np.random.default_rng(6).integers(0, 60, 777)
    s1, i1 = knn_search(g, g, 30, query_block=100)
    m1 = retrieval_metrics(g, labels, [1, 5, 20], query_block=100, map_block_bytes=100_000)
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz", allow_pickle=True)
        np.testing.assert_array_equal(got["s"], s1)
        np.testing.assert_array_equal(got["i"], i1)
        assert dict(got["m"].tolist()) == m1
