"""Evaluation benchmark: time and peak memory of the metrics, each method in its own process.

(a) ``knn``: N items, D dims, C classes (default 100k, 128, 10k): Recall@1/10/100 and mAP@R with
    the FAISS evaluator (``pipeline.eval.metrics.retrieval_metrics``) against a blocked brute-force
    torch matmul + top-k, in the same run; then the full-ranking mAP pass on its own.
(b) ``ijbc``: an IJB-C-sized synthetic protocol (470k images, 23k templates, 15.6M pairs,
    1:N with two galleries): template pooling, 1:1 TAR@FAR and 1:N, timed end to end.

    python benchmarks/eval.py knn            # ~4 min on 2 cores
    python benchmarks/eval.py ijbc           # ~1 min
    python benchmarks/eval.py knn --n 20000 --classes 2000   # quicker

Columns: wall time, CPU time of the process (all threads: on a shared machine the steadier of the
two), peak memory. Peak memory is the process's high-water mark (VmHWM, reset after the data is built) minus its
resident size after imports and a tiny warm-up run, so it counts the data plus everything the
method allocates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets the high-water mark to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def knn_data(n: int, dim: int, classes: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes)
    emb = rng.standard_normal((classes, dim), dtype=np.float32)[labels]
    emb += noise * rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, labels


def torch_brute_force(emb: np.ndarray, labels: np.ndarray, ks: list[int], block: int = 1024):
    """Blocked exact search with torch (matmul + topk), textbook metrics (no tie handling)."""
    import torch

    x = torch.from_numpy(emb)
    lab = torch.from_numpy(labels)
    sizes = torch.bincount(lab)
    k = min(max(max(ks), int(sizes.max()) - 1), len(emb) - 1)
    hits = {kk: 0.0 for kk in ks}
    map_r = 0.0
    n_q = 0
    for b0 in range(0, len(emb), block):
        sims = x[b0 : b0 + block] @ x.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + b0] = -torch.inf  # self match removed by index
        _, idx = sims.topk(k, dim=1)
        del sims
        q_lab = lab[b0 : b0 + block]
        rel = (lab[idx] == q_lab[:, None]).double()
        R = (sizes[q_lab] - 1).double()
        ok = R > 0
        for kk in ks:
            hits[kk] += float(rel[:, :kk].amax(1)[ok].sum())
        prec = rel.cumsum(1) / torch.arange(1, k + 1)
        within = torch.arange(k)[None, :] < R[:, None]
        map_r += float(((prec * rel * within).sum(1) / R.clamp(min=1))[ok].sum())
        n_q += int(ok.sum())
    out = {f"recall@{kk}": v / n_q for kk, v in hits.items()}
    out["map@r"] = map_r / n_q
    return out


def ijbc_data(images: int, templates: int, pairs: int, dim: int, subjects: int, seed: int = 0):
    from pipeline.eval.ijbc import Gallery, IJBCProtocol

    rng = np.random.default_rng(seed)
    t_subject = rng.integers(0, subjects, templates)
    t_subject[:subjects] = np.arange(subjects)  # every subject has a template
    img_t = np.sort(rng.integers(0, templates, images))
    img_media = img_t * 8 + rng.integers(0, 8, images)  # up to 8 media per template
    centers = rng.standard_normal((subjects, dim), dtype=np.float32)
    feats = centers[t_subject[img_t]]
    # Template-level noise twice the subject signal: genuine cosines ~0.2 against impostor
    # spread ~0.045, so TAR climbs from ~0.4 at FAR 1e-6 towards 1 at 1e-1 (not all 1.0).
    feats += 2.0 * rng.standard_normal((templates, dim), dtype=np.float32)[img_t]
    feats += 1.5 * rng.standard_normal((images, dim), dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    # 1:1: IJB-C has ~19.5k genuine pairs among 15.6M.
    by_subject = np.argsort(t_subject, kind="stable")
    n_gen = min(19_557, pairs // 2)
    a = rng.integers(0, templates, n_gen * 2)
    same = by_subject[
        np.clip(np.searchsorted(t_subject[by_subject], t_subject[a]), 0, templates - 1)
    ]
    gen = np.stack([a, same], 1)
    gen = gen[(gen[:, 0] != gen[:, 1]) & (t_subject[gen[:, 0]] == t_subject[gen[:, 1]])][:n_gen]
    imp = rng.integers(0, templates, (pairs - len(gen), 2))
    t1 = np.r_[gen[:, 0], imp[:, 0]]
    t2 = np.r_[gen[:, 1], imp[:, 1]]
    label = (t_subject[t1] == t_subject[t2]).astype(np.int64)
    # 1:N: one template per subject, subjects split between G1 and G2; the others are probes.
    first = np.unique(t_subject, return_index=True)[1]
    half = subjects // 2
    protocol = IJBCProtocol(t1, t2, label)
    protocol.galleries = {
        "G1": Gallery(first[:half], t_subject[first[:half]]),
        "G2": Gallery(first[half:], t_subject[first[half:]]),
    }
    probes = np.setdiff1d(np.arange(templates), first)[:19_593]
    protocol.probe_templates, protocol.probe_subjects = probes, t_subject[probes]
    return feats, img_t, img_media, protocol


def _warm_up() -> None:
    """Import and run torch and FAISS once on tiny data, so that their libraries, thread pools
    and BLAS buffers are in the baseline rather than charged to the first method."""
    import torch

    from pipeline.eval.metrics import retrieval_metrics

    x = np.random.default_rng(1).standard_normal((512, 8)).astype(np.float32)
    retrieval_metrics(x, np.arange(512) % 50, [1, 4])
    torch.from_numpy(x) @ torch.from_numpy(x).T


def worker(args: argparse.Namespace) -> dict:
    from pipeline.eval.metrics import retrieval_metrics

    _warm_up()
    base_kb = _status_kb("VmRSS")
    if args.worker.startswith("knn"):
        emb, labels = knn_data(args.n, args.dim, args.classes, args.noise)
        data_bytes = emb.nbytes
    else:
        feats, tids, mids, protocol = ijbc_data(
            args.images, args.templates, args.pairs, args.dim, args.subjects
        )
        data_bytes = feats.nbytes
    _reset_peak()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if args.worker == "knn_faiss":
        metrics = retrieval_metrics(emb, labels, [1, 10, 100], normalize=False, full_map=False)
    elif args.worker == "knn_faiss_map":
        metrics = retrieval_metrics(emb, labels, [1, 10, 100], normalize=False, full_map=True)
    elif args.worker == "knn_torch":
        metrics = torch_brute_force(emb, labels, [1, 10, 100])
    else:
        from pipeline.eval.ijbc import ijbc_metrics

        metrics, _ = ijbc_metrics(feats, tids, mids, protocol)
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    peak_mb = (_status_kb("VmHWM") - base_kb) / 1024
    return {
        "method": args.worker,
        "seconds": seconds,
        "cpu_seconds": cpu_s,
        "peak_mb_above_warm_start": peak_mb,
        "data_mb": data_bytes / 2**20,
        "metrics": metrics,
    }


def run_worker(method: str, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, *argv],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("part", nargs="?", choices=["knn", "ijbc"], default="knn")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=None, help="128 for knn, 512 for ijbc")
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--noise", type=float, default=1.3)
    p.add_argument("--images", type=int, default=470_000)
    p.add_argument("--templates", type=int, default=23_124)
    p.add_argument("--pairs", type=int, default=15_658_489)
    p.add_argument("--subjects", type=int, default=3_531)
    args = p.parse_args()
    if args.dim is None:
        args.dim = 512 if (args.worker or args.part).startswith("ijbc") else 128
    if args.worker:
        print(json.dumps(worker(args)))
        return
    argv = [a for a in sys.argv[1:] if a not in ("knn", "ijbc")]
    import torch

    print(f"# {args.part}: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print("| method | wall | CPU | peak memory | metrics |")
    methods = ["knn_faiss", "knn_torch", "knn_faiss_map"] if args.part == "knn" else ["ijbc"]
    for method in methods:
        r = run_worker(method, argv)
        metrics = {k: round(v, 4) for k, v in r["metrics"].items() if not k.startswith("num_")}
        print(
            f"| {method} | {r['seconds']:.1f} s | {r['cpu_seconds']:.1f} s "
            f"| {r['peak_mb_above_warm_start']:.0f} MB "
            f"(data {r['data_mb']:.0f} MB) | {metrics} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
