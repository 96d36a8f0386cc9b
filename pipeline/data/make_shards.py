"""``pipeline make-shards FORMAT --root DIR --out DIR``: convert a dataset into WebDataset shards.

Each split goes to ``<out>/<split>/`` (shards, ``index.parquet``, ``sizes.json``,
``skipped.txt``); see ``shards/README.md``. ``pipeline make-shards synthetic --out
data/synthetic`` writes the built-in dataset's train and test splits in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.data.writer import DEFAULT_MAX_SKIPPED_FRACTION, ShardWriteError, write_split

FORMATS = ("vggface2", "inaturalist", "sop", "ijbc", "imagefolder", "synthetic")
DEFAULT_SPLITS = {
    "vggface2": "train,test",
    "inaturalist": "train,test",
    "sop": "train,test",
    "ijbc": "test",
    "imagefolder": "train",
    "synthetic": "train,test",
}
DEFAULT_NAMES = {"inaturalist": "inat"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=FORMATS, help="the dataset's layout")
    parser.add_argument("--root", help="the dataset's directory (not needed for synthetic)")
    parser.add_argument("--out", required=True, help="output directory; splits go to OUT/SPLIT/")
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
        default=0,
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    syn = parser.add_argument_group("synthetic")
    syn.add_argument("--classes", type=int, default=500, help="train classes")
    syn.add_argument("--test-classes", type=int, default=100, help="test classes (disjoint)")
    syn.add_argument("--images-per-class", type=int, default=20)
    syn.add_argument("--image-size", type=int, default=64, help="side in pixels")


def _items(args: argparse.Namespace, split: str) -> tuple[list, dict]:
    """(items, extra files) of one split."""
    if args.format == "synthetic":
        from pipeline.data.synthetic import synthetic_items

        return synthetic_items(
            split=split,
            num_classes=args.classes if split == "train" else args.test_classes,
            images_per_class=args.images_per_class,
            image_size=args.image_size,
            seed=args.seed,
            quality=args.quality,
        ), {}
    from pipeline.data import converters

    if not args.root:
        raise converters.LayoutError(f"make-shards {args.format} needs --root DIR")
    return converters.list_split(args.format, args.root, split)


def run(args: argparse.Namespace) -> int:
    from pipeline.data.converters import LayoutError

    name = args.name or DEFAULT_NAMES.get(args.format, args.format)
    splits = [s.strip() for s in (args.split or DEFAULT_SPLITS[args.format]).split(",") if s]
    for split in splits:
        start = time.time()
        try:
            items, extra = _items(args, split)
            summary = write_split(
                items,
                args.out,
                name=name,
                split=split,
                samples_per_shard=args.samples_per_shard,
                resize=args.resize,
                quality=args.quality,
                workers=args.workers,
                seed=args.seed,
                max_skipped_fraction=args.max_skipped_fraction,
                progress=not args.no_progress,
                extra_files=extra,
            )
        except (LayoutError, ShardWriteError, ValueError) as e:
            print(f"make-shards: error: {e}", file=sys.stderr)
            return 1
        print(f"{summary.line()} in {time.time() - start:.1f} s")
        if extra:
            print(f"  beside the shards: {', '.join(sorted(extra))}")
    return 0
