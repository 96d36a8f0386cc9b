"""Retrieval metrics: Recall@K, mAP@R, R-precision and mAP over the full ranking.

Every item is a query; its gallery is every other item (the self-match is removed by index,
never by dropping the first neighbour, which is wrong when duplicates tie with the query).

Ranks follow one tie convention everywhere, scikit-learn's (``average_precision_score``): an item
tied with a positive counts as ranked before it. The rank of gallery item j for a query is
r_j = #{items != query with score >= s_j}; the positives ranked at or above j are c_j. Then
(Musgrave et al., "A Metric Learning Reality Check", 2020) with R = other items of the label:

* recall@k   = 1 if some positive has r_j <= k;
* r_precision = #{positives with r_j <= R} / R;
* map@r      = (1/R) sum over positives with r_j <= R of c_j / r_j;
* map        = (1/R) sum over all positives of c_j / r_j (AP of the full ranking).

Without ties these are the textbook definitions. With ties, they do not depend on which tied
item FAISS happens to return: the kNN lists are searched to depth K + 2 (K = the deepest rank
any metric reads), and every rank <= K read off such a list is exact (see ``_list_ranks``).

Shape legend: N items, D dims, B query block, k list depth, C = largest class size.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pipeline.distributed import collectives, group
from pipeline.eval.knn import ExactIPIndex, as_float32_matrix, gallery_slice, iter_sharded_knn
from pipeline.eval.knn import resolve_gpus as _resolve_gpus

DEFAULT_KS: dict[str, tuple[int, ...]] = {
    "sop": (1, 10, 100, 1000),
    "inaturalist": (1, 4, 16, 32),
    "vehicleid": (1, 5),
}
"""Recall@K cut-offs the Smooth-AP paper reports per dataset."""


def check_inputs(
    embeddings: Any, labels: Any, name: str = "embeddings"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N x D embeddings, N labels); return float32 embeddings and labels coded 0..C-1."""
    emb = as_float32_matrix(embeddings, name)
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels: expected a 1-d array, got shape {lab.shape}")
    if lab.shape[0] != emb.shape[0]:
        raise ValueError(
            f"{name} has {emb.shape[0]} rows but labels has {lab.shape[0]} entries: "
            "pass one label per embedding, in the same order"
        )
    if emb.shape[0] < 2:
        raise ValueError(
            f"{name}: {emb.shape[0]} item(s): every item queries the others, so the gallery "
            "is empty; evaluate on at least 2 items (check eval_urls points to the test shards)"
        )
    _, codes = np.unique(lab, return_inverse=True)
    return emb, codes.astype(np.int64).reshape(-1)


def l2_normalize(emb_ND: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """Rows scaled to unit length (a new array unless they already are, within 1e-5)."""
    norms = np.linalg.norm(emb_ND, axis=1)
    if (norms == 0).any():
        rows = np.flatnonzero(norms == 0)
        raise ValueError(
            f"{name}: {rows.size} all-zero row(s) (first {rows[:5].tolist()}) have no direction "
            "for cosine similarity; check the model output"
        )
    if np.abs(norms - 1).max() <= 1e-5:
        return emb_ND  # the model's output is already normalised: no second copy of N x D
    return (emb_ND / norms[:, None]).astype(np.float32)


def _list_ranks(
    scores_Bk: np.ndarray, valid_Bk: np.ndarray, rel_Bk: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pessimistic ranks r and positive counts c of the items of score-sorted kNN lists.

    Returns (r_Bk, c_Bk, rel_Bk) in the list's re-sorted order (invalid entries last).
    Exactness: a list holding the top-k of the whole gallery holds every item scoring above its
    last score m, so r is exact for items scoring above m; an item scoring m gets r >= (number
    of valid entries), which is > K when the list holds >= K + 1 non-self items: such items never
    pass an r <= K test, whichever tied items FAISS kept.
    """
    s = np.where(valid_Bk, scores_Bk, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    s = np.take_along_axis(s, order, 1)
    rel = np.take_along_axis(rel_Bk & valid_Bk, order, 1)
    B, k = s.shape
    pos = np.arange(1, k + 1)
    is_group_end = np.ones((B, k), dtype=bool)
    is_group_end[:, :-1] = s[:, 1:] != s[:, :-1]
    end = np.where(is_group_end, pos[None, :], k + 1)
    # r_j = end of j's tie group = smallest group end at or after j.
    r = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]
    c = np.take_along_axis(np.cumsum(rel, axis=1), r - 1, 1)
    return r, c, rel


def list_metrics(
    query_ids_B: np.ndarray,
    scores_Bk: np.ndarray,
    ids_Bk: np.ndarray,
    codes_N: np.ndarray,
    class_sizes_C: np.ndarray,
    ks: Sequence[int],
) -> dict[str, np.ndarray]:
    """Per-query recall@k, r_precision and map@r from top-k lists that include the query itself.

    Queries with no other item of their label get NaN (the caller leaves them out and counts
    them). ``ids_Bk`` are global ids into ``codes_N``; -1 is padding.
    """
    q_codes = codes_N[query_ids_B]
    R = class_sizes_C[q_codes] - 1
    valid = (ids_Bk >= 0) & (ids_Bk != query_ids_B[:, None])  # self removed by index
    rel = valid & (codes_N[np.maximum(ids_Bk, 0)] == q_codes[:, None])
    r, c, rel = _list_ranks(scores_Bk, valid, rel)
    has_pos = R > 0
    R_safe = np.maximum(R, 1)[:, None]
    within_R = rel & (r <= R_safe)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"recall@{k}"] = (rel & (r <= k)).any(axis=1).astype(np.float64)
    out["r_precision"] = within_R.sum(axis=1) / R_safe[:, 0]
    out["map@r"] = np.where(within_R, c / r, 0.0).sum(axis=1) / R_safe[:, 0]
    for key in out:
        out[key] = np.where(has_pos, out[key], np.nan)
    return out


COMPARE_PASSES_MAX = 32
"""Up to this many positives per query, the CPU counts items >= each positive with one NumPy
compare pass each (~1.5 ns an item); beyond, one batched binary search (~6 ns an item x log)."""


def _count_at_least(S_Bn: Any, a_BC: Any) -> Any:
    """``ge[b, j]`` = #{i: S[b, i] >= a[b, j]} (int64, B x C); ``a`` sorted ascending per row."""
    B, C = a_BC.shape
    if S_Bn.device.type == "cpu" and C <= COMPARE_PASSES_MAX:
        S, a = S_Bn.numpy(), a_BC.cpu().numpy()
        ge = np.zeros((B, C), dtype=np.int64)

        def rows(lo: int, hi: int) -> None:
            buf = np.empty((hi - lo, S.shape[1]), dtype=bool)
            for j in range(C):
                np.greater_equal(S[lo:hi], a[lo:hi, j : j + 1], out=buf)
                ge[lo:hi, j] = np.count_nonzero(buf, axis=1)

        # NumPy releases the GIL in ufuncs: one thread per core, each on its own rows.
        threads = max(1, min(torch.get_num_threads(), B))
        cuts = np.linspace(0, B, threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(rows, cuts[:-1], cuts[1:]))
        return torch.from_numpy(ge).to(a_BC.device)
    # bucket = #positives <= the item; an item counts for every positive below its bucket.
    bucket = torch.searchsorted(a_BC.contiguous(), S_Bn, right=True, out_int32=True)
    offsets = torch.arange(B, device=S_Bn.device, dtype=torch.int32)[:, None] * (C + 1)
    hist = torch.bincount((bucket + offsets).view(-1), minlength=B * (C + 1)).view(B, C + 1)
    return hist.flip(1).cumsum(1).flip(1)[:, 1:]


def full_ranking_ap(
    emb_ND: np.ndarray,
    codes_N: np.ndarray,
    lo: int,
    hi: int,
    *,
    block_bytes: int = 64 << 20,
    device: Any = "cpu",
) -> np.ndarray:
    """Per-query AP over the full ranking (NaN without a positive); all ranks participate.

    Each rank scores a block of queries against its gallery slice ``[lo, hi)`` (a B x n_slice
    matrix, never N x N), contributes the scores of the positives it holds, and counts, for each
    positive score a_j, its items scoring >= a_j; positive scores and counts are summed over
    ranks. Every positive's score is read from the matrix that also counts it, so an item always
    counts itself.
    """
    N = emb_ND.shape[0]
    emb = torch.from_numpy(emb_ND).to(device)
    gal = emb[lo:hi]
    n_loc = hi - lo
    order = torch.from_numpy(np.argsort(codes_N, kind="stable")).to(device)
    sizes = np.bincount(codes_N)
    starts = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]])).to(device)
    sizes_t = torch.from_numpy(sizes).to(device)
    codes = torch.from_numpy(codes_N).to(device)
    C = int(sizes.max())
    slots = torch.arange(C, device=device)
    # Per (query, gallery item): S 4 bytes + compare buffer 1, or bucket 4 + offset index 4.
    B = max(1, min(N, block_bytes // max(1, 12 * n_loc)))
    ap_N = np.full(N, np.nan)
    for b0 in range(0, N, B):
        b1 = min(N, b0 + B)
        qid = torch.arange(b0, b1, device=device)
        S = emb[b0:b1] @ gal.T  # B x n_loc
        mine = (qid >= lo) & (qid < hi)
        S[mine.nonzero()[:, 0], qid[mine] - lo] = -torch.inf  # self removed by index
        qc = codes[b0:b1]
        member = order[(starts[qc][:, None] + slots[None, :]).clamp(max=N - 1)]
        is_pos = (slots[None, :] < sizes_t[qc][:, None]) & (member != qid[:, None])
        in_slice = is_pos & (member >= lo) & (member < hi)
        pos = torch.full(member.shape, -torch.inf, device=device)
        rows = in_slice.nonzero()
        pos[rows[:, 0], rows[:, 1]] = S[rows[:, 0], member[rows[:, 0], rows[:, 1]] - lo]
        if group.get_world_size() > 1:
            # All ranks participate: each positive's score lives on exactly one rank.
            # NCCL only moves CUDA tensors.
            pos = collectives.all_reduce_max(pos.to(group.device())).to(device)
        pos[~is_pos] = torch.inf  # padding sorts last and no finite score reaches it
        R = is_pos.sum(1)
        # Only as many positive slots as this block's largest class needs.
        a, _ = torch.sort(pos, dim=1)
        a = a[:, : max(1, int(R.max()))].contiguous()
        ge = _count_at_least(S, a)  # items of my slice scoring >= a_j
        del S
        if group.get_world_size() > 1:
            # All ranks participate.
            ge = collectives.all_reduce_sum(ge.to(group.device())).to(device)
        first_tied = torch.searchsorted(a, a, right=False)
        pos_ge = (R[:, None] - first_tied).double()
        valid = torch.arange(a.shape[1], device=device)[None, :] < R[:, None]
        ap = torch.where(valid, pos_ge / ge.double().clamp(min=1), 0.0).sum(1) / R.clamp(min=1)
        ap_N[b0:b1] = np.where(R.cpu().numpy() > 0, ap.cpu().numpy(), np.nan)
    return ap_N


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 4, 16, 32),
    *,
    normalize: bool = True,
    full_map: bool = True,
    query_block: int = 4096,
    map_block_bytes: int = 64 << 20,
    gpus: Sequence[int] | str = "auto",
    device: Any = "cpu",
) -> dict[str, float]:
    """Recall@K, mAP@R, R-precision and (``full_map``) mAP with every item querying the rest.

    ``embeddings`` N x D, ``labels`` N (any values; equal values = same class). Ranking is by
    inner product (cosine after ``normalize``). Under torch.distributed every rank passes the
    same full arrays, indexes only its gallery slice and gets the same result (all ranks
    participate). Returns floats: ``recall@{k}``, ``map@r``, ``r_precision``, ``map``, plus
    ``num_queries`` (used) and ``num_queries_without_positive`` (left out: no other item of
    their label). ``device`` is where the full-ranking mAP pass multiplies (``cuda`` on GPUs).
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={ks}: give a non-empty list of positive cut-offs (e.g. [1, 10, 100])")
    emb, codes = check_inputs(embeddings, labels)
    if normalize:
        emb = l2_normalize(emb)
    N = emb.shape[0]
    sizes = np.bincount(codes)
    if sizes.max() < 2:
        raise ValueError(
            "labels: every label occurs once, so no query has a positive; retrieval needs "
            "classes with at least 2 items (are the labels of the eval shards read correctly?)"
        )
    # Deepest rank any metric reads, then 2 more places: one for the query itself, one so
    # that items tied at the list's end rank > K (see _list_ranks).
    K = min(max(max(ks), int(sizes.max()) - 1), N - 1)
    k_search = min(K + 2, N)
    rank, world = group.get_rank(), group.get_world_size()
    lo, hi = gallery_slice(N, rank, world)
    index = ExactIPIndex(emb[lo:hi], lo, gpus=_resolve_gpus(gpus))
    per_query: dict[str, np.ndarray] = {}
    for start, s, i in iter_sharded_knn(emb, index, k_search, query_block):
        qids = np.arange(start, start + s.shape[0])
        for key, v in list_metrics(qids, s, i, codes, sizes, ks).items():
            per_query.setdefault(key, np.empty(N))[start : start + len(v)] = v
    del index
    if full_map:
        per_query["map"] = full_ranking_ap(
            emb, codes, lo, hi, block_bytes=map_block_bytes, device=device
        )
    n_q = int((sizes[codes] > 1).sum())
    # Means of per-query arrays: the same sum whatever the blocks or the number of ranks.
    out = {key: float(np.nanmean(v)) for key, v in per_query.items()}
    out["num_queries"] = float(n_q)
    out["num_queries_without_positive"] = float(N - n_q)
    return out
