"""Smooth-AP forward+backward: this project's loss vs the dense O(N^3) formulation.

Each measurement runs in a fresh subprocess so that its peak resident memory is
its own: the extra memory is the peak RSS during forward+backward minus the RSS
once the inputs exist (Linux: /proc/self/clear_refs resets the peak).

Compared in the same run, float32 on the CPU, D = 512, K = 4 images per class:
  ours   SmoothAPLoss (paper semantics)
  dense  the released code's formulation: B x B x B sigmoid tensors
  floor  what any exact implementation must do: the similarity matmul forward and
         backward, and n x K x N sigmoids

    python benchmarks/loss.py               # n = 384, 1024, 4096; dense at 384 only
    python benchmarks/loss.py --sizes 384 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

DENSE_MAX_N = 512  # B^3 float32 tensors: 1024^3 x 4 B = 4 GiB each, several alive at once


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _dense_loss(emb, num_classes, tau):
    """The released code's objective, written densely (B x B x B) from its math."""
    import torch

    B = emb.shape[0]
    g = B // num_classes
    sim = emb @ emb.T
    diff = sim[:, None, :] - sim[:, :, None]
    mask = 1.0 - torch.eye(B)
    rank_all = (torch.sigmoid(diff / tau) * mask).sum(-1) + 1.0
    blocks = emb.view(num_classes, g, -1)
    sim_pos = blocks @ blocks.transpose(1, 2)
    diff_pos = sim_pos[:, :, None, :] - sim_pos[:, :, :, None]
    rank_pos = (torch.sigmoid(diff_pos / tau) * (1.0 - torch.eye(g))).sum(-1) + 1.0
    idx = torch.arange(B).view(num_classes, g)
    rank_all_blocks = rank_all[idx[:, :, None], idx[:, None, :]]
    return 1.0 - (rank_pos / rank_all_blocks).sum() / (g * B)


def _measure(kind: str, n: int, k: int, d: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # Saturated sigmoids produce subnormal floats, whose slow path on x86 made
    # timings swing 10x between runs; flush them to zero for every kind alike.
    torch.set_flush_denormal(True)
    emb = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_(True)
    labels = torch.arange(n // k).repeat_interleave(k)
    if kind == "ours":
        from pipeline.loss import SmoothAPLoss

        loss_fn = SmoothAPLoss(0.01)

        def step():
            loss_fn(emb, labels).backward()

    elif kind == "dense":

        def step():
            _dense_loss(emb, n // k, 0.01).backward()

    elif kind == "floor":
        pos_idx = torch.arange(n).view(n // k, k).repeat_interleave(k, dim=0)
        chunk = max(1, (1 << 24) // (k * n))

        def step():
            sim = emb @ emb.T
            with torch.no_grad():
                z = sim / 0.01
                # Chunked like the loss, so that both touch the same amount of memory.
                for s in range(0, n, chunk):
                    z_c = z[s : s + chunk]
                    z_pos = z_c.gather(1, pos_idx[s : s + chunk])
                    torch.sub(z_c[:, None, :], z_pos[:, :, None]).sigmoid_()
            # Any (n, N) gradient drives the matmul's backward; ones avoid the
            # denormals that saturated sigmoids would feed to the matmul.
            sim.backward(torch.ones_like(sim))

    else:
        raise ValueError(kind)

    step()  # warm-up (allocator, thread pool)
    emb.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    base = _rss_kib("VmRSS")
    times = []
    for _ in range(repeats):
        emb.grad = None
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _rss_kib("VmHWM")
    return {"kind": kind, "n": n, "time_s": min(times), "extra_mib": (peak - base) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[384, 1024, 4096])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (1: immune to the other core being busy, which stalls "
        "2-thread ops on a shared 2-core machine)",
    )
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        print(json.dumps(_measure(a._child[0], int(a._child[1]), a.k, a.dim, a.repeats, a.threads)))
        return

    import torch

    print(f"torch {torch.__version__}, {a.threads} thread(s), float32, CPU")
    print(f"D = {a.dim}, K = {a.k}, best of {a.repeats}; extra = peak RSS - RSS with inputs\n")
    header = f"{'n':>6} {'kind':>6} {'fwd+bwd s':>10} {'extra MiB':>10}"
    print(header)
    rows = {}
    for n in a.sizes:
        for kind in ("ours", "floor", "dense"):
            if kind == "dense" and n > DENSE_MAX_N:
                continue
            args = ["--k", str(a.k), "--dim", str(a.dim), "--repeats", str(a.repeats)]
            args += ["--threads", str(a.threads)]
            out = subprocess.run(
                [sys.executable, __file__, *args, "--_child", kind, str(n)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows[(n, kind)] = r
            print(f"{n:>6} {kind:>6} {r['time_s']:>10.4f} {r['extra_mib']:>10.1f}", flush=True)
    print()
    for n in a.sizes:
        ours = rows[(n, "ours")]
        line = f"n={n}: ours/floor time {ours['time_s'] / rows[(n, 'floor')]['time_s']:.2f}x"
        if (n, "dense") in rows:
            dense = rows[(n, "dense")]
            line += (
                f"; dense/ours time {dense['time_s'] / ours['time_s']:.0f}x, "
                f"dense/ours extra memory {dense['extra_mib'] / max(ours['extra_mib'], 0.1):.0f}x"
            )
        else:
            line += f"; dense not run (B^3 float32 = {n**3 * 4 / 2**30:.1f} GiB per tensor)"
        print(line)


if __name__ == "__main__":
    main()
