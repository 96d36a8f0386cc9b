"""Exact inner-product k-nearest-neighbour search with FAISS, never an N x N matrix.

Queries are searched in blocks against an exact ``IndexFlatIP``. Two kinds of sharding:

* within a process, across the GPUs of a node: ``IndexShards`` (FAISS's own cloner with
  ``shard=True``) when faiss has GPU support (``faiss.get_num_gpus() > 0``);
* across ranks: each rank indexes a contiguous slice of the gallery, every rank searches every
  query block, and the per-rank top-k lists are merged by similarity (keep the largest) into the
  single-index result (:func:`merge_topk`).

FAISS's GPU indexes cap k at :data:`GPU_MAX_K`; a larger k on GPU is searched exactly with a
blocked torch matmul + stable sort on the same devices (mAP@R needs k >= largest class - 1).

Ties: which of several equally similar items FAISS keeps at the k-th place is unspecified (it
differs between its BLAS and scalar paths). Results here are returned sorted by score, ties by
ascending id; the metrics built on them (``pipeline.eval.metrics``) only use ranks that do not depend
on FAISS's choice among tied items.

Shape legend: B query block, N gallery items, D embedding dim, k neighbours, S shards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.distributed import collectives, group

log = logging.getLogger(__name__)

GPU_MAX_K = 2048
"""Largest k FAISS's GPU flat search supports (FAISS >= 1.7.3; it was 1024 before)."""

_INSTALL_HINT = (
    "FAISS is not installed: run `pip install -e '.[cpu]'` (faiss-cpu), or `pip install -e '.[gpu]'` "
    "(faiss-gpu) on CUDA clusters"
)


def import_faiss() -> Any:
    """Import faiss lazily (importing ``pipeline`` must not need it); explain how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return faiss


def num_faiss_gpus() -> int:
    """GPUs FAISS can use here (0 with faiss-cpu)."""
    faiss = import_faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def as_float32_matrix(x: Any, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, D) array; rejects other ranks and non-finite values."""
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array (items x dims), got shape {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{name}: {rows.size} row(s) hold NaN or inf (first rows {rows[:5].tolist()}); "
            "check the model output (a diverged checkpoint or fp16 overflow) before evaluating"
        )
    return arr


def _canonical_order(scores_Bk: np.ndarray, ids_Bk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score descending, ties by ascending id, padding (id -1) last."""
    # lexsort keys are applied last-to-first: primary -score, then padding flag, then id.
    pad = ids_Bk < 0
    order = np.lexsort((ids_Bk, pad, -scores_Bk.astype(np.float64)), axis=1)
    return np.take_along_axis(scores_Bk, order, 1), np.take_along_axis(ids_Bk, order, 1)


def merge_topk(
    scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists (B x k_s each, global ids) into the top-k of their union.

    Keeps the k largest scores (similarity semantics), ties by ascending id; padding entries
    (id -1, score -inf) sort last. If every input holds its shard's top-k, the result holds the
    top-k of the whole gallery: exactly what one index over all shards returns, up to the
    choice among items tied at the k-th score.
    """
    if not scores or len(scores) != len(ids):
        raise ValueError("merge_topk: give one scores and one ids array per shard (at least one)")
    s_all = np.concatenate([np.asarray(s, dtype=np.float32) for s in scores], axis=1)
    i_all = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids], axis=1)
    s_all = np.where(i_all < 0, -np.inf, s_all).astype(np.float32)
    if s_all.shape[1] > k:
        # Keep a superset (everything >= the k-th score) cheaply, then order it exactly.
        kth = -np.partition(-s_all, k - 1, axis=1)[:, k - 1 : k]
        keep = s_all >= kth
        width = int(keep.sum(1).max())
        order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
        s_all = np.take_along_axis(s_all, order, 1)
        i_all = np.take_along_axis(i_all, order, 1)
        i_all = np.where(np.take_along_axis(keep, order, 1), i_all, -1)
        s_all = np.where(i_all < 0, -np.inf, s_all).astype(np.float32)
    s_all, i_all = _canonical_order(s_all, i_all)
    s_out = np.full((s_all.shape[0], k), -np.inf, dtype=np.float32)
    i_out = np.full((s_all.shape[0], k), -1, dtype=np.int64)
    w = min(k, s_all.shape[1])
    s_out[:, :w], i_out[:, :w] = s_all[:, :w], i_all[:, :w]
    return s_out, i_out


class ExactIPIndex:
    """Exact inner-product search over one gallery (or one rank's slice of it).

    ``gallery`` rows get the global ids ``id_offset .. id_offset + n - 1``. ``gpus``: the CUDA
    devices to spread the gallery over (``IndexShards``); empty means the CPU. ``cpu_shards``
    splits a CPU index the same way (``IndexShards`` of flat indexes), which is how the GPU
    layout is tested on machines without a GPU.
    """

    def __init__(
        self,
        gallery_ND: np.ndarray,
        id_offset: int = 0,
        *,
        gpus: Sequence[int] = (),
        cpu_shards: int = 1,
    ) -> None:
        self.faiss = import_faiss()
        self.gallery_ND = as_float32_matrix(gallery_ND, "gallery")
        self.ntotal, self.dim = self.gallery_ND.shape
        self.id_offset = int(id_offset)
        self.gpus = list(gpus)
        if cpu_shards < 1:
            raise ValueError(f"cpu_shards={cpu_shards}: must be >= 1")
        self._torch_gallery: list[Any] | None = None  # built on first k > GPU_MAX_K search
        self._parts: list[Any] = []  # sub-indexes must outlive the IndexShards that uses them
        self.index = self._build(cpu_shards)

    def _build(self, cpu_shards: int) -> Any:
        faiss = self.faiss
        if self.gpus:
            cpu_index = faiss.IndexFlatIP(self.dim)
            cpu_index.add(self.gallery_ND)
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True  # split the gallery over the GPUs (IndexShards), not replicate it
            # The GPU indexes use these resources: keep them alive as long as the index.
            self._parts = [faiss.StandardGpuResources() for _ in self.gpus]
            return faiss.index_cpu_to_gpu_multiple_py(self._parts, cpu_index, co, self.gpus)
        if cpu_shards == 1:
            index = faiss.IndexFlatIP(self.dim)
            index.add(self.gallery_ND)
            return index
        # successive_ids: shard s holds ids after those of shards < s, like one flat index.
        index = faiss.IndexShards(self.dim, True, True)
        for part in np.array_split(self.gallery_ND, cpu_shards):
            sub = faiss.IndexFlatIP(self.dim)
            sub.add(np.ascontiguousarray(part))
            self._parts.append(sub)
            index.add_shard(sub)
        return index

    def search(self, queries_BD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (B x k scores, B x k global ids), score-sorted, ties by id, padded with -inf/-1.

        Any k >= 1: with k beyond this gallery, the extra places are padding.
        """
        if k < 1:
            raise ValueError(f"k={k}: must be >= 1")
        q = as_float32_matrix(queries_BD, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(
                f"queries have {q.shape[1]} dims but the gallery has {self.dim}: "
                "embed queries and gallery with the same model"
            )
        k_eff = min(k, self.ntotal)
        if k_eff == 0:
            scores = np.empty((q.shape[0], 0), np.float32)
            ids = np.empty((q.shape[0], 0), np.int64)
        elif self.gpus and k_eff > GPU_MAX_K:
            scores, ids = self._search_torch(q, k_eff)
        else:
            scores, ids = self.index.search(q, k_eff)
            ids = np.where(ids >= 0, ids + self.id_offset, -1)
        # ``merge_topk`` pads to k, fixes the tie order, and turns FAISS's -FLT_MAX padding into -inf.
        return merge_topk([scores], [ids], k)

    def _search_torch(self, q_BD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k for k beyond FAISS's GPU limit: per-GPU gallery chunks, merged."""
        devices = [torch.device("cuda", g) for g in self.gpus] if self.gpus else ["cpu"]
        if self._torch_gallery is None:
            bounds = np.linspace(0, self.ntotal, len(devices) + 1).astype(int)
            self._torch_gallery = [
                (int(lo), torch.from_numpy(self.gallery_ND[lo:hi]).to(dev))
                for lo, hi, dev in zip(bounds[:-1], bounds[1:], devices)
            ]
        scores, ids = [], []
        for lo, g_nD in self._torch_gallery:
            if g_nD.shape[0] == 0:
                continue
            sims = torch.from_numpy(q_BD).to(g_nD.device) @ g_nD.T
            # A stable descending sort keeps ties in id order (torch.topk does not promise it).
            top, idx = torch.sort(sims, dim=1, descending=True, stable=True)
            kk = min(k, g_nD.shape[0])
            scores.append(top[:, :kk].cpu().numpy())
            ids.append(idx[:, :kk].cpu().numpy().astype(np.int64) + lo + self.id_offset)
        return merge_topk(scores, ids, k)


def gallery_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous gallery rows ``[lo, hi)`` rank ``rank`` indexes (sizes differ by <= 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world size {world_size})")
    # np.array_split's rule: the first n % world_size slices get one extra row.
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def iter_sharded_knn(
    queries_ND: np.ndarray,
    index: ExactIPIndex,
    k: int,
    query_block: int = 4096,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, scores_Bk, ids_Bk)`` for each block of queries, merged across ranks.

    Every rank passes the same ``queries_ND`` and its own gallery slice in ``index`` (global ids
    via ``id_offset``); all ranks participate in each block and all receive the merged top-k of
    the whole gallery. With one process this is a blocked search of ``index``.
    """
    if query_block < 1:
        raise ValueError(f"query_block={query_block}: must be >= 1")
    for start in range(0, queries_ND.shape[0], query_block):
        s_loc, i_loc = index.search(queries_ND[start : start + query_block], k)
        s_all, i_all = collectives.all_gather_topk(s_loc, i_loc)  # all ranks participate
        if len(s_all) == 1:
            yield start, s_all[0], i_all[0]
        else:
            yield start, *merge_topk(s_all, i_all, k)


def knn_search(
    queries_ND: np.ndarray,
    gallery_ND: np.ndarray,
    k: int,
    *,
    query_block: int = 4096,
    gpus: Sequence[int] | str = "auto",
    cpu_shards: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours of every query in the whole gallery.

    Returns (n_queries x k scores, n_queries x k gallery ids). Under torch.distributed every rank
    passes the full ``gallery_ND``, indexes only its slice (:func:`gallery_slice`) and receives
    the merged result (all ranks participate). ``gpus='auto'``: this rank's GPU in a multi-rank
    job, every GPU FAISS sees in a single process, none with faiss-cpu.
    """
    gallery = as_float32_matrix(gallery_ND, "gallery")
    queries = as_float32_matrix(queries_ND, "queries")
    rank, world = group.get_rank(), group.get_world_size()
    lo, hi = gallery_slice(gallery.shape[0], rank, world)
    index = ExactIPIndex(gallery[lo:hi], lo, gpus=resolve_gpus(gpus), cpu_shards=cpu_shards)
    out_s = np.empty((queries.shape[0], k), np.float32)
    out_i = np.empty((queries.shape[0], k), np.int64)
    for start, s, i in iter_sharded_knn(queries, index, k, query_block):
        out_s[start : start + len(s)], out_i[start : start + len(i)] = s, i
    return out_s, out_i


def resolve_gpus(gpus: Sequence[int] | str) -> list[int]:
    """``'auto'`` -> the GPUs this process should index on; a list is taken as given."""
    if gpus != "auto":
        return [int(g) for g in gpus]
    n = num_faiss_gpus()
    if n == 0:
        return []

    if group.get_world_size() > 1:
        # One GPU per rank: the ranks already split the gallery between them.
        return [torch.cuda.current_device()]
    return list(range(n))
