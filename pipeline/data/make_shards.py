"""``pipeline make-shards FORMAT --root DIR --out DIR``: convert a dataset into WebDataset shards.

Each split goes to ``<out>/<split>/`` (shards, ``index.parquet``, ``sizes.json``,
``skipped.txt``); see ``shards/README.md``. ``pipeline make-shards synthetic --out
data/synthetic`` writes the built-in dataset's train and test splits in seconds.

Everything that can be known from the arguments is checked before any work (exit 2, one line):
argument ranges, ``--root`` against ``--out`` (no overlap), existing splits (``--overwrite``),
a writable output, and every split's list files. Failures while writing (a listed image that
does not exist, too many unreadable ones, a disk error) exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

from pipeline.data import converters, parts, storage
from pipeline.data.catalog import check_name
from pipeline.data.converters import LayoutError
from pipeline.data.faces import CROP_MODES, CropError, crop_record, describe
from pipeline.data.outdir import check_output, discard_partial
from pipeline.data.publish import check_s3_output, publish_split
from pipeline.data.synthetic import synthetic_items
from pipeline.data.writer import DEFAULT_MAX_SKIPPED_FRACTION, ShardWriteError, write_split
from pipeline.errors import UserError

FORMATS = ("vggface2", "inaturalist", "sop", "ijbc", "ijbb", "imagefolder", "synthetic")
DEFAULT_SPLITS = {
    "vggface2": "train,test",
    "inaturalist": "train,test",
    "sop": "train,test",
    "ijbc": "test",
    "ijbb": "test",
    "imagefolder": "train",
    "synthetic": "train,test",
}
DEFAULT_NAMES = {"inaturalist": "inat"}
DEFAULT_CROPS = {"ijbc": "aligned", "ijbb": "aligned"}
"""insightface's IJB-C and IJB-B releases are meant to be aligned by their five landmarks."""


class ShardArgumentError(UserError, ValueError):
    """A make-shards argument out of its range; the message names the flag, value and rule."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=FORMATS, help="the dataset's layout")
    parser.add_argument("--root", help="the dataset's directory (not needed for synthetic)")
    parser.add_argument(
        "--out",
        required=True,
        help="output directory or s3://bucket/prefix; splits go to OUT/SPLIT/ (to a store: "
        "written and validated on local disk under TMPDIR first, published catalog last)",
    )
    parser.add_argument(
        "--split",
        help="comma-separated splits (default: train,test; ijbc: test; imagefolder: train "
        "(the name given to the tree's only split))",
    )
    parser.add_argument("--name", help="dataset name in shard file names (default: the format)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, metavar="N")
    parser.add_argument(
        "--resize",
        type=int,
        metavar="SHORTER_SIDE",
        help="re-encode with the shorter side at this size (default: keep the original bytes)",
    )
    parser.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality")
    parser.add_argument("--workers", type=int, default=2, metavar="W", help="processes")
    parser.add_argument("--seed", type=int, default=0, help="class order (and synthetic images)")
    parser.add_argument(
        "--max-skipped-fraction",
        type=float,
        default=DEFAULT_MAX_SKIPPED_FRACTION,
        metavar="F",
        help="fail when more than this fraction of a split's images is unreadable "
        f"(default {DEFAULT_MAX_SKIPPED_FRACTION})",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing splits; only files make-shards wrote there are removed, and a "
        "split folder holding anything else is refused",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parts.add_arguments(parser)
    face = parser.add_argument_group("face crops (pipeline.data.faces)")
    face.add_argument(
        "--crop",
        choices=CROP_MODES,
        help="aligned: 5-point ArcFace alignment; loose: the VGGFace2 loose crop (box + 30%%, "
        "shorter side --crop-size); none: the images as they are (default; ijbc, ijbb: aligned)",
    )
    face.add_argument(
        "--crop-size",
        type=int,
        default=0,
        metavar="PX",
        help="aligned: the crop's side (multiple of 112 or 128, default 112); loose: its "
        "shorter side (default 256)",
    )
    face.add_argument(
        "--landmarks",
        metavar="CSV",
        help="any dataset: NAME_ID,P1X,P1Y,...,P5X,P5Y[,SCORE] (NAME_ID relative to --root, "
        "without extension); vggface2, ijbc and ijbb read their own files",
    )
    face.add_argument(
        "--boxes", metavar="CSV", help="any dataset: NAME_ID,X,Y,W,H face boxes (--crop loose)"
    )
    syn = parser.add_argument_group("synthetic")
    syn.add_argument("--classes", type=int, default=500, help="train classes")
    syn.add_argument("--test-classes", type=int, default=100, help="test classes (disjoint)")
    syn.add_argument("--images-per-class", type=int, default=20)
    syn.add_argument("--image-size", type=int, default=64, help="side in pixels")


def _items(args: argparse.Namespace, split: str) -> tuple[list, dict]:
    """(items, extra files) of one split."""
    if args.format == "synthetic":
        return synthetic_items(
            split=split,
            num_classes=args.classes if split == "train" else args.test_classes,
            images_per_class=args.images_per_class,
            image_size=args.image_size,
            seed=args.seed,
            quality=args.quality,
        ), {}
    return converters.list_split(
        args.format, args.root, split, _crop_mode(args), args.landmarks, args.boxes
    )


def _crop_mode(args: argparse.Namespace) -> str:
    return args.crop or DEFAULT_CROPS.get(args.format, "none")


def check_crop_arguments(args: argparse.Namespace) -> dict:
    """The crop record the arguments ask for (ShardArgumentError for a bad combination)."""
    mode = _crop_mode(args)
    try:
        record = crop_record(mode, args.crop_size)
    except CropError as e:
        raise ShardArgumentError(f"--crop {mode} --crop-size {args.crop_size}: {e}") from None
    if mode != "none" and args.resize:
        raise _refuse(
            "--resize",
            args.resize,
            f"does not go with --crop {mode}, whose size is --crop-size; leave --resize out",
        )
    if mode != "none" and args.format == "synthetic":
        raise _refuse("--crop", mode, "synthetic images have no faces; use --crop none")
    return record


def _refuse(flag: str, value, rule: str) -> ShardArgumentError:
    return ShardArgumentError(f"{flag} {value}: {rule}")


def check_arguments(args: argparse.Namespace, name: str, splits: list[str]) -> None:
    """Refuse out-of-range arguments before any work (ShardArgumentError, one line each)."""
    at_least_one = {
        "--samples-per-shard": (args.samples_per_shard, "samples per tar shard"),
        "--workers": (args.workers, "processes that decode images"),
    }
    if args.format == "synthetic":
        at_least_one["--classes"] = (args.classes, "train classes")
        at_least_one["--test-classes"] = (args.test_classes, "test classes")
        at_least_one["--images-per-class"] = (args.images_per_class, "images of each class")
        at_least_one["--image-size"] = (args.image_size, "side of the square images in pixels")
    for flag, (value, what) in at_least_one.items():
        if value < 1:
            raise _refuse(flag, value, f"must be a whole number >= 1 ({what}), e.g. {flag} 2")
    if args.resize is not None and args.resize < 1:
        raise _refuse(
            "--resize",
            args.resize,
            "the shorter side must be a positive number of pixels, e.g. --resize 256; leave "
            "--resize out to keep the original images",
        )
    if not 1 <= args.quality <= 100:
        raise _refuse("--quality", args.quality, "JPEG quality must be in 1..100, e.g. 90")
    f = args.max_skipped_fraction
    if math.isnan(f) or not 0 <= f <= 1:
        raise _refuse(
            "--max-skipped-fraction",
            f,
            "a fraction of a split's images, in 0..1 (0: fail on any unreadable image; "
            f"default {DEFAULT_MAX_SKIPPED_FRACTION})",
        )
    if args.seed < 0:
        raise _refuse("--seed", args.seed, "must be >= 0")
    for flag, value in [("--name", name), *(("--split", s) for s in splits)]:
        try:
            check_name(flag, value)
        except ValueError as e:
            raise ShardArgumentError(str(e)) from None
    if not splits:
        raise _refuse("--split", repr(args.split), "names no split; e.g. --split train,test")
    if len(set(splits)) != len(splits):
        raise _refuse("--split", args.split, "names a split twice; list each split once")


def _inputs(args: argparse.Namespace) -> list[Path]:
    """The dataset folder(s) the output must not overlap (none for synthetic)."""
    if args.format == "synthetic":
        return []
    if not args.root:
        raise LayoutError(f"make-shards {args.format} needs --root DIR (the dataset's folder)")
    root = Path(args.root)
    if not root.is_dir():
        raise LayoutError(
            f"--root {root} is not a directory; expected the {args.format} dataset's root"
        )
    return [root]


def _discard_staging(staging: Path, split: str) -> None:
    """Remove the local copy of a split uploaded to an object store (only what the writer
    wrote there: its split folder's files, then the two folders)."""
    if (staging / split).is_dir():
        discard_partial(staging / split)
    with contextlib.suppress(OSError):
        staging.rmdir()


def run(args: argparse.Namespace) -> int:
    name = args.name or DEFAULT_NAMES.get(args.format, args.format)
    splits = [s.strip() for s in (args.split or DEFAULT_SPLITS[args.format]).split(",")]
    splits = [s for s in splits if s]
    # Before any work, for every split: these raise user errors (cli: one line, exit 2).
    check_arguments(args, name, splits)
    crop = check_crop_arguments(args)
    parts.check_flags(args)
    inputs = _inputs(args)
    remote = storage.is_s3(args.out)
    for split in splits:
        if remote:
            check_s3_output(args.out, split, overwrite=args.overwrite)
        else:
            check_output(args.out, split, overwrite=args.overwrite, inputs=inputs)
    # Every split's listing too (a malformed list line is a LayoutError naming file and line),
    # so that no split is written when a later one cannot be.
    listed = {split: _items(args, split) for split in splits}
    if args.tasks:  # one part of an array, its merge, or the plan
        return parts.run(args, name, listed, inputs, crop)
    for split, (items, extra) in listed.items():
        start = time.time()
        staging = Path(tempfile.mkdtemp(prefix="make-shards-")) if remote else None
        try:
            summary = write_split(
                items,
                staging or args.out,
                name=name,
                split=split,
                samples_per_shard=args.samples_per_shard,
                resize=args.resize or 0,
                quality=args.quality,
                workers=args.workers,
                seed=args.seed,
                max_skipped_fraction=args.max_skipped_fraction,
                progress=not args.no_progress,
                extra_files=extra,
                overwrite=args.overwrite,
                inputs=inputs,
                crop=crop,
            )
            if staging is not None:
                summary.directory = publish_split(
                    staging / split, args.out, split, overwrite=args.overwrite
                )
        except (ShardWriteError, ValueError) as e:
            print(f"make-shards: error: {e}", file=sys.stderr)
            return 1
        finally:
            if staging is not None:
                _discard_staging(staging, split)
        print(f"{summary.line()} in {time.time() - start:.1f} s; face crop: {describe(crop)}")
        if extra:
            print(f"  beside the shards: {', '.join(sorted(extra))}")
    return 0
