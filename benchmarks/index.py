"""Gallery index benchmark: build time, query latency (p50, p99) and recall@10 of the exact and
compressed indexes of ``pipeline.serve.gallery_index`` over N synthetic D-dimensional unit vectors.

    python benchmarks/index.py                              # 1M x 512: exact + IVF-PQ (~6 min, 2 cores)
    python benchmarks/index.py --n 200000 --kinds exact,ivfpq,hnsw

Vectors: N / 100 cluster centres plus noise, L2-normalised (retrieval embeddings are clustered;
on uniform random vectors every approximate index looks worse than it would in use). Queries:
fresh vectors from the same distribution (not gallery items). Latency: one query per call
(``index.search`` with a 1 x D array), after 10 warm-up calls; recall@10: the fraction of the
exact top-10 found by the index, over ``--recall-queries`` queries searched as one batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def clustered(
    n: int, dim: int, centres: np.ndarray, rng: np.random.Generator, noise: float
) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 100_000):  # in blocks: peak memory stays near the output's
        hi = min(n, lo + 100_000)
        block = centres[rng.integers(0, len(centres), hi - lo)]
        block += noise * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        out[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kinds", default="exact,ivfpq")
    p.add_argument("--latency-queries", type=int, default=300)
    p.add_argument("--recall-queries", type=int, default=1000)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--noise", type=float, default=0.3, help="per-dimension noise around centres")
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: all)")
    args = p.parse_args()

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    from pipeline.serve.gallery_index import IndexParams, build_index, recall_at_k, search_index

    print(
        f"N={args.n} D={args.dim} noise={args.noise}; faiss {faiss.__version__}, {os.cpu_count()} CPUs, "
        f"omp threads {faiss.omp_get_max_threads()}"
    )
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(1, args.n // 100), args.dim), dtype=np.float32)
    t = time.perf_counter()
    gallery = clustered(args.n, args.dim, centres, rng, args.noise)
    queries = clustered(
        max(args.latency_queries, args.recall_queries), args.dim, centres, rng, args.noise
    )
    print(f"data: {time.perf_counter() - t:.1f} s, {gallery.nbytes / 2**30:.2f} GiB of vectors")

    exact_ids = None
    rows = []
    for kind in args.kinds.split(","):
        t = time.perf_counter()
        index, params = build_index(gallery, IndexParams(kind=kind, nprobe=args.nprobe))
        build_s = time.perf_counter() - t
        for q in queries[:10]:
            index.search(q[None], 10)
        lat = []
        for q in queries[: args.latency_queries]:
            t = time.perf_counter()
            index.search(q[None], 10)
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, ids = search_index(index, queries[: args.recall_queries], 10)
        batch_s = time.perf_counter() - t
        if kind == "exact":
            exact_ids = ids
        recall = recall_at_k(ids, exact_ids) if exact_ids is not None else float("nan")
        p50, p99 = np.percentile(np.asarray(lat) * 1e3, [50, 99])
        size = faiss.serialize_index(index).nbytes / 2**20
        extra = {
            k: v
            for k, v in vars(params).items()
            if k in ("nlist", "pq_m", "nprobe", "hnsw_m", "ef_search")
        }
        row = (
            f"| {kind} | {build_s:.1f} s | {p50:.2f} ms | {p99:.2f} ms | "
            f"{args.recall_queries / batch_s:.0f} q/s | {recall:.4f} | {size:.0f} MiB | {extra if kind != 'exact' else ''} |"
        )
        print(row, f"(rss {rss_gib():.1f} GiB)", flush=True)
        rows.append(row)
        del index
    print(
        "\n| index | build | p50 (1 query) | p99 | batched throughput | recall@10 vs exact | size | params |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
