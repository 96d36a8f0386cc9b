"""make-shards over N tasks (``pipeline.data.parts``) against one task, on the same images.

Times, in one process and one core each (``workers=1``): the single-task conversion; each of the
N parts; the merge. With N tasks on N cores, the array's wall time is its slowest part plus the
merge, so the speed-up is single / (max part + merge), and the merge, which runs once, bounds it:
single / merge. The merge copies the parts' image bytes (no decode) and validates the split
(every image decoded once more), which is why it is not free. The merged split is checked to be
byte-identical to the single-task split.

    python benchmarks/make_shards_array.py                      # 1000 images 400x320, 4 parts
    python benchmarks/make_shards_array.py --size 800x600 --resize 256   # iNaturalist-like
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.data import parts  # noqa: E402
from pipeline.data.items import SourceItem  # noqa: E402
from pipeline.data.writer import write_split  # noqa: E402


def make_images(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> list:
    """Photo-like JPEGs (smooth colour fields plus mild noise, quality 90) and their items."""
    rng = np.random.default_rng(0)
    items = []
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    for c in range(classes):
        for i in range(per_class):
            a = rng.uniform(0, 6, size=(3, 3))
            field = np.stack([np.sin(a[k, 0] * xx + a[k, 1] * yy + a[k, 2]) for k in range(3)], -1)
            pixels = (127 + 100 * field + rng.normal(0, 6, (h, w, 3))).clip(0, 255)
            path = root / f"c{c:04d}" / f"{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
            items.append(SourceItem(f"c{c:04d}", f"c{c:04d}/{i:03d}.jpg", str(path)))
    return items


def timed(fn) -> tuple[float, float]:
    """(wall s, CPU s of this process) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=40)
    p.add_argument("--per-class", type=int, default=25)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--resize", type=int, default=128, help="shorter side (re-encode)")
    p.add_argument("--size", default="400x320", help="source images, WIDTHxHEIGHT")
    args = p.parse_args()
    opts = dict(samples_per_shard=200, resize=args.resize, quality=90, workers=1, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = tuple(int(v) for v in args.size.split("x"))
        items = make_images(tmp / "src", args.classes, args.per_class, size)
        common = dict(name="bench", split="train", seed=0)
        # Warm-up: the writer's imports (webdataset, torch) are not part of any figure.
        write_split(items[:2], tmp / "warm", **common, **opts)
        one = timed(lambda: write_split(items, tmp / "one", **common, **opts))
        settings = {"resize": args.resize}
        part_args = dict(tasks=args.tasks, settings=settings, **common, **opts)
        part_times = [
            timed(lambda t=t: parts.write_part(items, tmp / "many", task=t, **part_args))
            for t in range(args.tasks)
        ]
        merge = timed(
            lambda: parts.merge_parts(
                items, tmp / "many", tasks=args.tasks, settings=settings, **common, **opts
            )
        )
        a, b = tmp / "one" / "train", tmp / "many" / "train"
        same = all((b / f.name).read_bytes() == f.read_bytes() for f in a.iterdir())
    slowest = max(t[0] for t in part_times)
    print(
        f"{len(items)} images {args.size} -> --resize {args.resize}, {args.tasks} parts, 1 core each"
    )
    print(f"single task:   {one[0]:7.2f} s wall, {one[1]:7.2f} s CPU")
    for t, (wall, cpu) in enumerate(part_times):
        print(f"part {t}:        {wall:7.2f} s wall, {cpu:7.2f} s CPU")
    print(f"sum of parts:  {sum(t[0] for t in part_times):7.2f} s wall")
    print(f"merge:         {merge[0]:7.2f} s wall, {merge[1]:7.2f} s CPU")
    print(f"merged split byte-identical to the single task's: {same}")
    print(
        f"ratios: merge / single = {merge[1] / one[1]:.2f} (CPU); array wall on {args.tasks} "
        f"cores = slowest part + merge = {slowest + merge[0]:.2f} s, speed-up "
        f"{one[0] / (slowest + merge[0]):.2f}x; bound for many tasks: single / merge = "
        f"{one[1] / merge[1]:.1f}x"
    )


if __name__ == "__main__":
    main()
