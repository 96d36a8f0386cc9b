"""``pipeline build-gallery``: embed a gallery with a trained model into a FAISS index on disk.

    pipeline build-gallery --config CFG --weights PATH --shards data/sop/test --out gallery/
    pipeline build-gallery --config CFG --weights PATH --images my_photos/ --out gallery/ --kind hnsw

The index directory it writes (``index.faiss``, ``items.parquet``, ``manifest.json``) is
``pipeline.serve.gallery_files``; the FAISS index kinds, their building, search and measured
recall are ``pipeline.serve.gallery_index``. This module embeds the gallery and runs the command.

Shards are embedded with the evaluation's distributed extraction
(``pipeline.eval.extract.extract_embeddings``: all ranks take part, every sample once); an image
folder (ImageFolder layout: a sub-folder per class, or loose files) with the same decode and eval
transform, its files dealt to the ranks. An unreadable image is skipped, listed in
``skipped.txt`` and counted, never silently dropped.

Kinds: ``exact`` (the default), ``hnsw`` and ``ivfpq``; a compressed index's recall@10
against the exact search is printed and stored in the manifest.

Shape legend: N gallery items, Q queries, D embedding dims, k neighbours.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config.load import add_config_arguments, split_weights
from pipeline.config.schema import DataConfig
from pipeline.data.catalog import read_index, split_dir
from pipeline.data.converters import LANDMARK_COLUMNS, read_geometry_csv
from pipeline.data.faces import CropError
from pipeline.data.image import model_input
from pipeline.data.writer import DEFAULT_MAX_SKIPPED_FRACTION
from pipeline.distributed import collectives, group
from pipeline.eval.extract import extract_embeddings, sort_by_row
from pipeline.serve.export import load_weights_model, preprocessing_spec
from pipeline.serve.gallery_files import MANIFEST_FORMAT, write_gallery
from pipeline.serve.gallery_index import (
    KINDS,
    RECALL_K,
    RECALL_QUERIES,
    GalleryError,
    IndexParams,
    build_index,
    measure_recall,
)
from pipeline.weights import model_weights_record, resolve_weights_path

SKIPPED_FILE = "skipped.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# ---------------------------------------------------------------------------- embedding


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), by suffix."""
    if not folder.is_dir():
        raise GalleryError(f"--images {str(folder)!r} is not a directory; pass a folder of images")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise GalleryError(
            f"--images {str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
        )
    return files


def load_image_tensor(path: Path, data_cfg: DataConfig, landmarks: Any = None) -> torch.Tensor:
    """One file as the model sees it, by the one image path (``pipeline.data.image.
    model_input``: make-shards' decode, the face crop or its size check, the eval transform);
    GalleryError if it is not an image, ``faces.CropError`` if it is not a face crop of the
    model's kind and has no ``landmarks``."""
    try:
        spec = preprocessing_spec(data_cfg, None)
        return torch.from_numpy(
            model_input(path.read_bytes(), spec, landmarks=landmarks, what=str(path))
        )
    except CropError:
        raise
    except Exception as e:
        raise GalleryError(
            f"{path}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass JPEG, PNG or another format Pillow reads"
        ) from None


def embed_files(
    model: torch.nn.Module,
    files: list[Path],
    data_cfg: DataConfig,
    *,
    device: Any = "cpu",
    batch_size: int = 64,
    skip_bad: bool = False,
    landmarks: list[Any] | None = None,
) -> tuple[np.ndarray, list[int], list[tuple[Path, str]]]:
    """Embeddings of the readable ``files`` (float32 (n, D)), their positions in ``files``, and
    the skipped (path, reason) pairs (only with ``skip_bad``; else the first bad file raises).
    ``landmarks``: per file, its five landmarks or None (aligned-face models)."""

    model.eval()
    dtype = next(model.parameters()).dtype
    embs, kept, skipped, batch = [], [], [], []

    def flush() -> None:
        if batch:
            with torch.no_grad():
                out = model(torch.stack(batch).to(device, dtype=dtype))
            embs.append(out.float().cpu().numpy())
            batch.clear()

    for i, f in enumerate(files):
        try:
            batch.append(load_image_tensor(f, data_cfg, landmarks[i] if landmarks else None))
        except (GalleryError, CropError) as e:
            if not skip_bad:
                raise
            skipped.append((f, str(e)))
            continue
        kept.append(i)
        if len(batch) == batch_size:
            flush()
    flush()
    dim = model.head.out_features
    return (np.concatenate(embs) if embs else np.zeros((0, dim), np.float32)), kept, skipped


def _folder_gallery(
    model: torch.nn.Module,
    folder: Path,
    data_cfg: DataConfig,
    device: Any,
    batch_size: int,
    landmarks: dict[str, list[float]] | None = None,
) -> tuple[np.ndarray, dict[str, list], list[tuple[Path, str]]]:
    """Embed an image folder, its files dealt to the ranks (all ranks participate);
    ``landmarks``: five landmarks by path under ``folder`` without extension (face models)."""
    files = list_images(folder)
    rank, world = group.get_rank(), group.get_world_size()
    mine = list(range(rank, len(files), world))
    marks = [(landmarks or {}).get(str(files[i].relative_to(folder).with_suffix(""))) for i in mine]
    emb, kept, skipped = embed_files(
        model,
        [files[i] for i in mine],
        data_cfg,
        device=device,
        batch_size=batch_size,
        skip_bad=True,
        landmarks=marks,
    )
    index = np.asarray([mine[i] for i in kept], np.int64)
    emb, index = (
        collectives.all_gather_rows(emb),
        collectives.all_gather_rows(index),
    )  # all ranks participate
    every = collectives.all_gather_objects(skipped)  # all ranks participate
    skipped = sorted(s for part in every for s in part)
    e, _ = sort_by_row(emb, np.zeros(len(index), np.int64), index)
    kept_files = [files[int(i)] for i in e.row_N]
    classes = sorted({str(f.parent.relative_to(folder)) for f in kept_files} - {"."})
    label_of = {c: i for i, c in enumerate(classes)}
    names = [str(f.parent.relative_to(folder)) for f in kept_files]
    items = {
        "key": [str(f.relative_to(folder).with_suffix("")) for f in kept_files],
        "source": [str(f.resolve()) for f in kept_files],
        "label": [label_of.get(c, -1) for c in names],
        "class_name": [None if c == "." else c for c in names],
    }
    return e.emb_ND, items, skipped


def _shard_gallery(
    model: torch.nn.Module, shards: str, data_cfg: DataConfig, device: Any, batch_size: int
) -> tuple[np.ndarray, dict[str, list]]:
    """Embed a split of shards with the evaluation's extraction (all ranks participate)."""
    e = extract_embeddings(model, shards, data_cfg, device=device, batch_size=batch_size)
    table = read_index(shards).select(["key", "shard", "label", "class_name"]).to_pydict()
    rows = e.row_N.tolist()
    items = {
        "key": [table["key"][i] for i in rows],
        "source": [table["shard"][i] for i in rows],
        "label": e.labels_N.tolist(),
        "class_name": [table["class_name"][i] for i in rows],
    }
    return e.emb_ND, items


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "config overrides (data.image_size, ...)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", default=None, help="a split of shards (directory or spec)")
    source.add_argument("--images", default=None, help="a folder of images (class sub-folders)")
    parser.add_argument("--out", required=True, help="index directory to write (must be new)")
    parser.add_argument("--kind", default="exact", help=f"one of {', '.join(KINDS)}")
    parser.add_argument(
        "--landmarks",
        default=None,
        metavar="CSV",
        help="--images of an aligned-face model: NAME_ID (path under the folder, without "
        "extension),P1X,P1Y,...,P5Y; images without a row must be aligned crops already",
    )
    parser.add_argument("--batch-size", type=int, default=0, help="default: eval.batch_size")
    defaults = IndexParams()
    for name in ("hnsw_m", "ef_construction", "ef_search", "nlist", "pq_m", "nprobe", "train_size"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    parser.add_argument(
        "--max-skipped-fraction",
        type=float,
        default=DEFAULT_MAX_SKIPPED_FRACTION,
        metavar="F",
        help="--images: fail when more than this fraction of the images is unreadable, as "
        f"make-shards does (default {DEFAULT_MAX_SKIPPED_FRACTION})",
    )


def _check_fraction(fraction: float) -> None:
    if math.isnan(fraction) or not 0 <= fraction <= 1:
        raise GalleryError(
            f"--max-skipped-fraction {fraction}: a fraction of the images, in 0..1 (0: fail on "
            f"any unreadable image; default {DEFAULT_MAX_SKIPPED_FRACTION})"
        )


def _check_skipped(skipped: list[tuple[Path, str]], listed: int, args: argparse.Namespace) -> None:
    """The limit ``make-shards`` puts on unreadable images, for a folder gallery."""
    limit = args.max_skipped_fraction
    if not listed or len(skipped) / listed <= limit:
        return
    first = "; ".join(why for _, why in skipped[:2])
    raise GalleryError(
        f"{len(skipped)} of {listed} images ({len(skipped) / listed:.1%}) of --images "
        f"{args.images!r} are unreadable, above the limit of {limit:.1%} (first: {first}); fix "
        "or remove them, or raise --max-skipped-fraction"
    )


def run(args: argparse.Namespace) -> int:
    params = IndexParams(
        kind=args.kind,
        **{
            k: getattr(args, k)
            for k in (
                "hnsw_m",
                "ef_construction",
                "ef_search",
                "nlist",
                "pq_m",
                "nprobe",
                "train_size",
            )
        },
    )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise GalleryError(
            f"--out {str(out)!r} is a file; --out names the index directory to write: pick a "
            "new directory name"
        )
    _check_fraction(args.max_skipped_fraction)
    if out.exists() and any(out.iterdir()):
        raise GalleryError(
            f"--out {str(out)!r} exists and is not empty; pipeline build-gallery does not overwrite: "
            "pick a new directory"
        )
    # Joins the job's group (none for one process) and always leaves it.
    with group.process_group():
        model, cfg, checkpoint = _load_model(args)
        batch_size = args.batch_size or cfg.eval.batch_size
        device = group.device()
        model.to(device)
        start = time.perf_counter()
        skipped: list[tuple[Path, str]] = []
        if args.shards:
            emb, items = _shard_gallery(model, args.shards, cfg.data, device, batch_size)
        else:
            marks = None
            if args.landmarks:
                marks = read_geometry_csv(Path(args.landmarks), LANDMARK_COLUMNS)
            emb, items, skipped = _folder_gallery(
                model, Path(args.images), cfg.data, device, batch_size, marks
            )
            _check_skipped(skipped, len(emb) + len(skipped), args)  # the same on every rank
        embed_s = time.perf_counter() - start
        if len(emb) == 0:  # the same on every rank (gathered)
            raise GalleryError(f"no image of {args.shards or args.images!r} could be embedded")
        if group.is_main_process():
            _build_and_write(
                out, emb, items, skipped, params, model, cfg, checkpoint, args, embed_s
            )
        collectives.barrier()  # all ranks participate: the index exists when every rank returns
    return 0


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``load_weights_model`` of ``--weights``, a checkpoint root resolved to one tag on rank 0
    so that every rank embeds with the same step (all ranks participate)."""
    given, overrides = split_weights(args.weights, args.overrides)
    path, root = collectives.on_main(lambda: resolve_weights_path(given))
    model, cfg, checkpoint = load_weights_model(args.config, path, overrides, args.shards or "")
    model.weights_origin = replace(model.weights_origin, resolved_from=root)
    if root and group.is_main_process():
        print(model.weights_origin.describe(), file=sys.stderr)
    return model, cfg, checkpoint


def _build_and_write(
    out, emb, items, skipped, params, model, cfg, checkpoint, args, embed_s
) -> None:
    start = time.perf_counter()
    index, params = build_index(emb, params)
    build_s = time.perf_counter() - start
    recall = None
    if params.kind != "exact":
        recall = measure_recall(index, emb)
        print(
            f"[index] {params.kind}: recall@{RECALL_K} = {recall:.4f} against the exact index "
            f"({min(RECALL_QUERIES, len(emb))} gallery items as queries)"
        )
    manifest = {
        "format": MANIFEST_FORMAT,
        "index": asdict(params),
        "count": len(emb),
        "dim": int(emb.shape[1]),
        "checkpoint": checkpoint,
        "weights": model_weights_record(model),
        "architecture": model.architecture,
        "preprocessing": preprocessing_spec(cfg.data, model.head.out_features),
        "source": {"shards": str(split_dir(args.shards).resolve())}
        if args.shards
        else {"images": str(Path(args.images).resolve())},
        f"recall_at_{RECALL_K}": recall,
        "skipped": len(skipped),
        "embed_s": round(embed_s, 3),
        "build_s": round(build_s, 3),
    }
    write_gallery(out, index, items, manifest)
    if skipped:
        (out / SKIPPED_FILE).write_text("".join(f"{p}\t{why}\n" for p, why in skipped))
        print(f"[index] skipped {len(skipped)} unreadable images, listed in {out / SKIPPED_FILE}")
    print(
        f"[index] wrote {out}: {len(emb)} items, {emb.shape[1]} dims, {params.kind}; "
        f"embedding {embed_s:.1f} s, index build {build_s:.2f} s"
    )
