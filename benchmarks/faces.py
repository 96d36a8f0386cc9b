"""make-shards throughput with face alignment against without, on the same images.

The images (made here): VGGFace2-like photos of --width x --height, a smooth pattern plus
noise, saved as JPEG quality 90, each with five landmarks placed like a face's (the ArcFace
template, scaled to a face about a third of the image, moved per image). Both runs write the
same images with ``pipeline.data.writer.write_split`` (decode, mode rules, crop, JPEG encode,
tar, catalog, validation), the same number of worker processes:

  (a) none     the images as they are (``--crop none``; RGB JPEGs are kept byte for byte, so
               this is decode-to-check + tar)
  (b) resize   the images re-encoded with the shorter side --resize (``--resize``): a baseline
               that also decodes and encodes every image
  (c) aligned  five-point alignment to --size x --size, then JPEG (``--crop aligned``)

Each figure is the best of --repeats (interleaved), images per wall-clock second. Beside the
whole command, the image step alone (in this process, no tar, no encode): ``image.decode``
against ``image.shard_pixels`` with the aligned crop, on the same bytes.

    python benchmarks/faces.py                       # 600 images 400x500, 1 worker
    python benchmarks/faces.py --images 2000 --workers 2
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _make(root: Path, n: int, width: int, height: int) -> list:
    import numpy as np
    from PIL import Image

    from pipeline.data.faces import ARCFACE_112
    from pipeline.data.items import SourceItem

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 80 * np.sin(xx / 23), 128 + 80 * np.cos(yy / 31), (xx + yy) % 256], -1)
    items = []
    for i in range(n):
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = root / f"id{i % 50:03d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue())
        scale = min(width, height) / 3 / 112 * rng.uniform(0.8, 1.2)
        shift = rng.uniform([0.2 * width, 0.2 * height], [0.5 * width, 0.5 * height])
        landmarks = (ARCFACE_112 * scale + shift).reshape(-1).tolist()
        items.append(
            SourceItem(
                class_name=path.parent.name,
                source=str(path.relative_to(root)),
                path=str(path),
                face={"landmarks": landmarks},
            )
        )
    return items


def _time(items, out: Path, workers: int, **kwargs) -> float:
    from pipeline.data.writer import write_split

    start = time.perf_counter()
    write_split(items, out, name="bench", split="train", workers=workers, progress=False, **kwargs)
    return len(items) / (time.perf_counter() - start)


def _pixels_rate(items, crop: dict | None) -> float:
    from pipeline.data.image import decode, shard_pixels

    blobs = [(Path(it.path).read_bytes(), it.face["landmarks"]) for it in items]
    start = time.perf_counter()
    for data, marks in blobs:
        if crop is None:
            decode(data)
        else:
            shard_pixels(data, crop, landmarks=marks)
    return len(blobs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=500)
    parser.add_argument("--size", type=int, default=112, help="aligned crop side")
    parser.add_argument("--resize", type=int, default=256, help="baseline (b): shorter side")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from pipeline.data.faces import crop_record

    with tempfile.TemporaryDirectory(prefix="bench-faces-") as tmp:
        tmp = Path(tmp)
        items = _make(tmp / "raw", args.images, args.width, args.height)
        runs = {
            "none": {},
            "resize": {"resize": args.resize},
            "aligned": {"crop": crop_record("aligned", args.size)},
        }
        best = dict.fromkeys(runs, 0.0)
        _time(items[:20], tmp / "warm-up", args.workers)  # imports, first-call costs
        for r in range(args.repeats):
            for name, kwargs in runs.items():
                rate = _time(items, tmp / f"{name}{r}", args.workers, **kwargs)
                best[name] = max(best[name], rate)
            step = {"decode": None, "decode+align": runs["aligned"]["crop"]}
            for name, crop in step.items():
                best[name] = max(best.get(name, 0.0), _pixels_rate(items, crop))
    print(
        f"{args.images} images {args.width}x{args.height} JPEG, {args.workers} worker(s), "
        f"best of {args.repeats}"
    )
    for name, rate in best.items():
        print(f"  {name:<13} {rate:8.1f} images/s")
    print(f"aligned / none:   {best['aligned'] / best['none']:.2f}x")
    print(f"aligned / resize: {best['aligned'] / best['resize']:.2f}x")
    print(f"image step alone: decode+align / decode: {best['decode+align'] / best['decode']:.2f}x")


if __name__ == "__main__":
    main()
