"""A gallery's FAISS index: its kinds and parameters, building, searching, measured recall.

Kinds: ``exact`` (``IndexFlatIP``, the default: the evaluation's exact inner product), ``hnsw``
(``IndexHNSWFlat``, inner product; ~1.1x the raw vectors' memory, fast queries) and ``ivfpq``
(``IndexIVFPQ``: ``pq_m`` bytes per item, for galleries of many millions). A compressed index
is checked at build time: recall@10 against the exact search for up to 1000 gallery items used
as queries. The index directory on disk: ``pipeline.serve.gallery_files``; the command that
builds one: ``pipeline.serve.gallery``.

Shape legend: N gallery items, Q queries, D embedding dims, k neighbours.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.eval.knn import ExactIPIndex, as_float32_matrix, import_faiss, merge_topk

KINDS = ("exact", "hnsw", "ivfpq")
RECALL_K = 10
RECALL_QUERIES = 1000


class GalleryError(UserError, ValueError):
    """Bad gallery input (folder, index directory, query image); names the file and the fix."""


@dataclass
class IndexParams:
    """How the FAISS index is built and searched (stored in the manifest)."""

    kind: str = "exact"
    hnsw_m: int = 32
    """HNSW: neighbours per node (memory ~ N x (4D + 8M) bytes)."""
    ef_construction: int = 80
    ef_search: int = 128
    """HNSW: candidate list size at query time (recall vs latency)."""
    nlist: int = 0
    """IVF-PQ: inverted lists; 0 = round(sqrt(N)) clipped to [1, N // 39] (FAISS wants >= 39
    training points per list)."""
    pq_m: int = 0
    """IVF-PQ: sub-quantizers = bytes per item; 0 = D // 8 (8 dims each), must divide D."""
    nprobe: int = 32
    """IVF-PQ: lists visited per query."""
    train_size: int = 100_000
    """IVF-PQ: items (a seeded sample) the coarse quantizer and PQ codebooks are trained on."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GalleryError(f"--kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "train_size"):
            if getattr(self, name) < 1:
                raise GalleryError(
                    f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1"
                )


def build_index(emb_ND: np.ndarray, params: IndexParams) -> tuple[Any, IndexParams]:
    """A FAISS index over ``emb_ND`` (inner product) and the parameters actually used."""
    faiss = import_faiss()
    emb = as_float32_matrix(emb_ND, "gallery embeddings")
    n, dim = emb.shape
    if params.kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
    else:
        pq_m = params.pq_m or max(1, dim // 8)
        if dim % pq_m:
            raise GalleryError(f"--pq-m {pq_m} does not divide the embedding dimension {dim}")
        # 8-bit PQ codebooks have 256 centroids: FAISS needs at least that many points.
        if n < 256:
            raise GalleryError(
                f"--kind ivfpq needs at least 256 gallery items to train its codebooks, got "
                f"{n}; use --kind exact (or hnsw) for a gallery this small"
            )
        nlist = params.nlist or min(max(1, round(math.sqrt(n))), max(1, n // 39))
        params = IndexParams(**{**asdict(params), "pq_m": pq_m, "nlist": nlist})
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).permutation(n)[: max(params.train_size, 256)]
        index.train(emb[np.sort(sample)])
    index.add(emb)
    set_search_params(index, params)
    return index, params


def set_search_params(index: Any, params: IndexParams) -> None:
    """Apply the query-time parameters (HNSW efSearch, IVF nprobe) to a loaded index."""
    faiss = import_faiss()
    if params.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = params.ef_search
    elif params.kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = params.nprobe


def search_index(index: Any, queries_QD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, gallery rows), score-descending, ties by ascending row, padded -inf / -1:
    the order of ``pipeline.eval.knn`` (so an exact index gives exactly the evaluation's kNN)."""
    q = as_float32_matrix(queries_QD, "queries")
    k_eff = min(k, index.ntotal)
    scores, ids = index.search(q, k_eff)
    return merge_topk([scores], [ids], k)


def recall_at_k(approx_ids_Qk: np.ndarray, exact_ids_Qk: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k that the approximate top-k found."""
    hits = [
        len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum())
        for a, e in zip(approx_ids_Qk, exact_ids_Qk)
    ]
    return float(np.mean(hits)) if hits else 1.0


def measure_recall(
    index: Any, emb_ND: np.ndarray, k: int = RECALL_K, queries: int = RECALL_QUERIES
) -> float:
    """recall@k of ``index`` against exact inner-product search, with up to ``queries`` gallery
    items (a seeded sample) as queries."""
    rows = np.sort(np.random.default_rng(0).permutation(len(emb_ND))[:queries])
    _, exact = ExactIPIndex(emb_ND).search(emb_ND[rows], k)
    _, approx = search_index(index, emb_ND[rows], k)
    return recall_at_k(approx, exact)
