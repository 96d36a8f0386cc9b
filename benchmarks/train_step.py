"""Time one training step, split into data wait, forward, loss, backward and optimizer.

    python benchmarks/train_step.py                      # CPU: tiny synthetic shards, resnet18 64 px
    python benchmarks/train_step.py --device cuda --backbone resnet50 --image-size 224 \\
        --precision bf16 --batch-sizes 64,128,256 --tensors      # GPU (benchmarks/gpu_smoke.sh)

The step is the training loop's own (``pipeline.train.trainer.Trainer.train_step``): DeepSpeed
engine, Smooth-AP across ranks, gradient clipping, the gradient norm it logs, optimizer. Each
phase is timed between device synchronisations, so the split is exact and the sum is a little
slower than an unsynchronised step; ``step_s`` gives images/s. The baseline in the same run is the step
without the gradient cache vs with it (``--chunk``: the cache's extra forward).

Runs in one process, or under torchrun (each rank times its own step; rank 0 prints).
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config.load import load_config
from pipeline.distributed import group


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(args, cfg, batch: int, device: torch.device):
    """(images, labels) forever: random tensors, or the real P x K stream of shards."""
    k = cfg.sampler.samples_per_class
    if args.tensors:
        labels = torch.arange(batch // k).repeat_interleave(k).to(device)
        s = args.image_size
        while True:
            yield torch.randn(batch, 3, s, s, device=device), labels
    from pipeline.data.stream import train_loader

    epoch = 0
    while True:
        for images, labels in train_loader(
            cfg.data,
            cfg.sampler,
            rank=group.get_rank(),
            world_size=group.get_world_size(),
            epoch=epoch,
        ):
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        epoch += 1


def bench(args, batch: int, chunk: int, run_dir: str) -> dict[str, float]:
    from contextlib import ExitStack

    from pipeline.train.entry import open_trainer

    k = 4
    overrides = [
        f"model.backbone={args.backbone}",
        "model.embedding_dim=512",
        "model.freeze_bn=true",  # the paper's recipe; the gradient cache needs it
        f"data.image_size={args.image_size}",
        f"data.resize_size={args.image_size}",
        f"data.num_workers={args.workers}",
        f"data.train=[{{name: synthetic, urls: {args.data}/train}}]",
        f"sampler.classes_per_batch={batch // k}",
        f"sampler.samples_per_class={k}",
        f"sampler.steps_per_epoch={args.steps + args.warmup}",
        f"sampler.shuffle_buffer_groups={max(batch // k, 64)}",
        f"train.precision={args.precision}",
        f"train.chunk_size={chunk}",
        f"train.output_dir={run_dir}/batch{batch}_chunk{chunk}",
        "optim.lr=0.0001",
        "tracking.enabled=false",
    ]
    cfg = load_config(None, overrides)
    # The training loop's own step: model, engine, loss and step as `pipeline train` runs them.
    stack = ExitStack()
    trainer = stack.enter_context(open_trainer(cfg))
    device = trainer.device
    data = _batches(args, cfg, batch, device)
    marks: dict[str, float] = {}

    def mark(phase: str) -> None:
        _sync(device)
        marks[phase] = time.perf_counter()

    phases: dict[str, list[float]] = {
        k: [] for k in ("data", "forward", "loss", "backward", "optimizer", "step_s")
    }
    trainer.engine.train()
    for i in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        images, labels = next(data)
        _sync(device)
        t1 = time.perf_counter()
        marks.clear()
        trainer.train_step(images, labels, on_phase=mark)
        t4, t5 = marks["backward"], marks["optimizer"]
        # The gradient cache interleaves its phases; its split is (no-grad forward + loss +
        # re-forward/backward) and shows as forward = all of it.
        t2, t3 = marks.get("forward", t4), marks.get("loss", t4)
        if i >= args.warmup:
            for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
                phases[key].append(value)
    stack.close()
    med = {k: statistics.median(v) for k, v in phases.items()}
    world = group.get_world_size()
    med["images_per_s_per_rank"] = batch / med["step_s"]
    med["global_batch"] = batch * world
    med["loss_share"] = med["loss"] / med["step_s"]
    return med


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-sizes", default="64", help="per-rank batch sizes, comma-separated")
    p.add_argument("--chunk", type=int, default=0, help="also time the gradient cache (chunk size)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--data", default="data/synthetic", help="shards (make-shards synthetic)")
    p.add_argument("--tensors", action="store_true", help="random tensors instead of shards")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args()
    group.init()
    rows = []
    # Trainers need a run directory; nothing is saved into it (no checkpoint is due).
    scratch = tempfile.TemporaryDirectory(prefix="train_step_bench_")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for chunk in [0] + ([args.chunk] if args.chunk else []):
            r = bench(args, batch, chunk, scratch.name)
            r.update(batch_per_rank=batch, chunk=chunk)
            rows.append(r)
            if group.is_main_process():
                print(
                    f"batch {batch:>4}/rank x {group.get_world_size()} chunk {chunk:>3}: "
                    + "  ".join(
                        f"{k} {r[k] * 1e3:7.1f} ms"
                        for k in ("data", "forward", "loss", "backward", "optimizer", "step_s")
                    )
                    + f"  | {r['images_per_s_per_rank']:7.1f} img/s/rank"
                    + f"  loss share {100 * r['loss_share']:4.1f} %",
                    flush=True,
                )
    if args.out and group.is_main_process():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"source": "tensors" if args.tensors else args.data, **vars(args)}
        Path(args.out).write_text(json.dumps({"args": meta, "rows": rows}, indent=1))
    group.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
