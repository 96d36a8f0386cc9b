"""Cost of preflight's tar-header walk (``pipeline.data.tarheaders.scan_shard``) against reading
the same shards with Python's ``tarfile`` (what ``validate-shards`` and a naive check do: every
member's bytes are read).

    python benchmarks/tar_headers.py --samples 20000 --image-size 128 --repeats 3

Writes a synthetic split with ``pipeline make-shards synthetic``'s writer into a temporary
folder, then times both on the same shards (page cache warm for both: the second and later
repeats). Prints per-sample times and the ratio.
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

from pipeline.data.synthetic import synthetic_items
from pipeline.data.tarheaders import scan_shard
from pipeline.data.writer import write_split


def _tarfile_read(shards: list[Path]) -> int:
    n = 0
    for shard in shards:
        with tarfile.open(shard, "r|*") as tar:
            for m in tar:
                f = tar.extractfile(m)
                if f is not None:
                    f.read()
                    n += 1
    return n


def _scan(shards: list[Path]) -> int:
    for shard in shards:
        problem = scan_shard(shard)
        if problem:
            raise SystemExit(f"{shard}: {problem}")
    return len(shards)


def _best(fn, shards: list[Path], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(shards)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--samples-per-shard", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tarheaders-") as tmp:
        items = synthetic_items(
            split="train",
            num_classes=args.samples // args.per_class,
            images_per_class=args.per_class,
            image_size=args.image_size,
            seed=0,
            quality=90,
        )
        write_split(
            items,
            Path(tmp),
            name="synthetic",
            split="train",
            samples_per_shard=args.samples_per_shard,
            workers=2,
            seed=0,
            progress=False,
        )
        shards = sorted((Path(tmp) / "train").glob("*.tar"))
        total_mb = sum(s.stat().st_size for s in shards) / 2**20
        _tarfile_read(shards)  # warm the page cache for both
        scan = _best(_scan, shards, args.repeats)
        full = _best(_tarfile_read, shards, args.repeats)
    n = len(items)
    print(f"{n} samples ({3 * n} members) in {len(shards)} shards, {total_mb:.0f} MiB")
    print(f"header walk (scan_shard): {scan:.3f} s = {scan / n * 1e6:.1f} us/sample")
    print(f"tarfile, every member read: {full:.3f} s = {full / n * 1e6:.1f} us/sample")
    print(f"ratio tarfile / header walk: {full / scan:.1f}x")


if __name__ == "__main__":
    main()
