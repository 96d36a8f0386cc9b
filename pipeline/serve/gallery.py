"""``pipeline build-gallery``: embed a gallery with a trained model into a FAISS index on disk.

    pipeline build-gallery --config CFG --weights PATH --shards data/sop/test --out gallery/
    pipeline build-gallery --config CFG --weights PATH --images my_photos/ --out gallery/ --kind hnsw

An index directory holds:

    index.faiss      the FAISS index; row i is gallery item i
    items.parquet    one row per item: row, key, source (shard file or image path), label,
                     class_name (label -1 / class_name null where unknown)
    manifest.json    kind and search parameters, size, dimension, the checkpoint and its
                     architecture, the preprocessing sizes, recall@10 of a compressed index

Shards are embedded with the evaluation's distributed extraction
(``pipeline.eval.extract.extract_embeddings``: all ranks take part, every sample once); an image
folder (ImageFolder layout: a sub-folder per class, or loose files) with the same decode and eval
transform, its files dealt to the ranks. An unreadable image is skipped, listed in
``skipped.txt`` and counted, never silently dropped.

Kinds: ``exact`` (``IndexFlatIP``, the default: the evaluation's exact inner product), ``hnsw``
(``IndexHNSWFlat``, inner product; ~1.1x the raw vectors' memory, fast queries) and ``ivfpq``
(``IndexIVFPQ``: ``pq_m`` bytes per item, for galleries of many millions). A compressed index
is checked at build time: recall@10 against the exact search for up to 1000 gallery items used
as queries, printed and stored in the manifest.

Shape legend: N gallery items, Q queries, D embedding dims, k neighbours.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config.load import add_config_arguments
from pipeline.config.schema import DataConfig
from pipeline.data.catalog import read_index, split_dir
from pipeline.data.transforms import decode_image, draft_side, eval_transform
from pipeline.distributed import collectives, group
from pipeline.errors import UserError
from pipeline.eval.extract import extract_embeddings, sort_by_index
from pipeline.eval.knn import ExactIPIndex, as_float32_matrix, import_faiss, merge_topk
from pipeline.serve.export import load_weights_model, preprocessing_spec

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.parquet"
MANIFEST_FILE = "manifest.json"
SKIPPED_FILE = "skipped.txt"
MANIFEST_FORMAT = "smoothap-gallery-v1"
KINDS = ("exact", "hnsw", "ivfpq")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
RECALL_K = 10
RECALL_QUERIES = 1000


class GalleryError(UserError, ValueError):
    """Bad gallery input (folder, index directory, query image); names the file and the fix."""


@dataclass
class IndexParams:
    """How the FAISS index is built and searched (stored in the manifest)."""

    kind: str = "exact"
    hnsw_m: int = 32
    """HNSW: neighbours per node (memory ~ N x (4D + 8M) bytes)."""
    ef_construction: int = 80
    ef_search: int = 128
    """HNSW: candidate list size at query time (recall vs latency)."""
    nlist: int = 0
    """IVF-PQ: inverted lists; 0 = round(sqrt(N)) clipped to [1, N // 39] (FAISS wants >= 39
    training points per list)."""
    pq_m: int = 0
    """IVF-PQ: sub-quantizers = bytes per item; 0 = D // 8 (8 dims each), must divide D."""
    nprobe: int = 32
    """IVF-PQ: lists visited per query."""
    train_size: int = 100_000
    """IVF-PQ: items (a seeded sample) the coarse quantizer and PQ codebooks are trained on."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GalleryError(f"--kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "train_size"):
            if getattr(self, name) < 1:
                raise GalleryError(
                    f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1"
                )


def build_index(emb_ND: np.ndarray, params: IndexParams) -> tuple[Any, IndexParams]:
    """A FAISS index over ``emb_ND`` (inner product) and the parameters actually used."""
    faiss = import_faiss()
    emb = as_float32_matrix(emb_ND, "gallery embeddings")
    n, dim = emb.shape
    if params.kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
    else:
        pq_m = params.pq_m or max(1, dim // 8)
        if dim % pq_m:
            raise GalleryError(f"--pq-m {pq_m} does not divide the embedding dimension {dim}")
        # 8-bit PQ codebooks have 256 centroids: FAISS needs at least that many points.
        if n < 256:
            raise GalleryError(
                f"--kind ivfpq needs at least 256 gallery items to train its codebooks, got "
                f"{n}; use --kind exact (or hnsw) for a gallery this small"
            )
        nlist = params.nlist or min(max(1, round(math.sqrt(n))), max(1, n // 39))
        params = IndexParams(**{**asdict(params), "pq_m": pq_m, "nlist": nlist})
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).permutation(n)[: max(params.train_size, 256)]
        index.train(emb[np.sort(sample)])
    index.add(emb)
    set_search_params(index, params)
    return index, params


def set_search_params(index: Any, params: IndexParams) -> None:
    """Apply the query-time parameters (HNSW efSearch, IVF nprobe) to a loaded index."""
    faiss = import_faiss()
    if params.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = params.ef_search
    elif params.kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = params.nprobe


def search_index(index: Any, queries_QD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, gallery rows), score-descending, ties by ascending row, padded -inf / -1:
    the order of ``pipeline.eval.knn`` (so an exact index gives exactly the evaluation's kNN)."""
    q = as_float32_matrix(queries_QD, "queries")
    k_eff = min(k, index.ntotal)
    scores, ids = index.search(q, k_eff)
    return merge_topk([scores], [ids], k)


def recall_at_k(approx_ids_Qk: np.ndarray, exact_ids_Qk: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k that the approximate top-k found."""
    hits = [
        len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum())
        for a, e in zip(approx_ids_Qk, exact_ids_Qk)
    ]
    return float(np.mean(hits)) if hits else 1.0


def measure_recall(
    index: Any, emb_ND: np.ndarray, k: int = RECALL_K, queries: int = RECALL_QUERIES
) -> float:
    """recall@k of ``index`` against exact inner-product search, with up to ``queries`` gallery
    items (a seeded sample) as queries."""
    rows = np.sort(np.random.default_rng(0).permutation(len(emb_ND))[:queries])
    _, exact = ExactIPIndex(emb_ND).search(emb_ND[rows], k)
    _, approx = search_index(index, emb_ND[rows], k)
    return recall_at_k(approx, exact)


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


def load_image_tensor(path: Path, data_cfg: DataConfig) -> torch.Tensor:
    """Decode and eval-transform one file as the eval loader does; GalleryError if it is not
    an image."""
    try:
        image = decode_image(path.read_bytes(), draft_side(data_cfg, train=False))
    except Exception as e:
        raise GalleryError(
            f"{path}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass JPEG, PNG or another format Pillow reads"
        ) from None
    return eval_transform(data_cfg)(image)


def embed_files(
    model: torch.nn.Module,
    files: list[Path],
    data_cfg: DataConfig,
    *,
    device: Any = "cpu",
    batch_size: int = 64,
    skip_bad: bool = False,
) -> tuple[np.ndarray, list[int], list[tuple[Path, str]]]:
    """Embeddings of the readable ``files`` (float32 (n, D)), their positions in ``files``, and
    the skipped (path, reason) pairs (only with ``skip_bad``; else the first bad file raises)."""
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
            batch.append(load_image_tensor(f, data_cfg))
        except GalleryError as e:
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
    model: torch.nn.Module, folder: Path, data_cfg: DataConfig, device: Any, batch_size: int
) -> tuple[np.ndarray, dict[str, list], list[tuple[Path, str]]]:
    """Embed an image folder, its files dealt to the ranks (all ranks participate)."""
    files = list_images(folder)
    rank, world = group.get_rank(), group.get_world_size()
    mine = list(range(rank, len(files), world))
    emb, kept, skipped = embed_files(
        model,
        [files[i] for i in mine],
        data_cfg,
        device=device,
        batch_size=batch_size,
        skip_bad=True,
    )
    index = np.asarray([mine[i] for i in kept], np.int64)
    emb, index = (
        collectives.all_gather_rows(emb),
        collectives.all_gather_rows(index),
    )  # all ranks participate
    every = collectives.all_gather_objects(skipped)  # all ranks participate
    skipped = sorted(s for part in every for s in part)
    e, _ = sort_by_index(emb, np.zeros(len(index), np.int64), index)
    kept_files = [files[int(i)] for i in e.index_N]
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
    rows = e.index_N.tolist()
    items = {
        "key": [table["key"][i] for i in rows],
        "source": [table["shard"][i] for i in rows],
        "label": e.labels_N.tolist(),
        "class_name": [table["class_name"][i] for i in rows],
    }
    return e.emb_ND, items


# ---------------------------------------------------------------------------- files


def write_gallery(out: Path, index: Any, items: dict[str, list], manifest: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    import_faiss().write_index(index, str(out / INDEX_FILE))
    table = pa.table(
        {
            "row": pa.array(range(len(items["key"])), pa.int64()),
            "key": pa.array(items["key"], pa.string()),
            "source": pa.array(items["source"], pa.string()),
            "label": pa.array(items["label"], pa.int64()),
            "class_name": pa.array(items["class_name"], pa.string()),
        }
    )
    pq.write_table(table, out / ITEMS_FILE)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass
class Gallery:
    """An index directory, read back."""

    directory: Path
    index: Any
    items: dict[str, list]
    manifest: dict[str, Any]

    @property
    def params(self) -> IndexParams:
        return IndexParams(**self.manifest["index"])


def read_gallery(directory: str | Path) -> Gallery:
    """Read an index directory written by ``pipeline build-gallery`` (GalleryError if it is not one)."""
    directory = Path(directory)
    missing = [f for f in (INDEX_FILE, ITEMS_FILE, MANIFEST_FILE) if not (directory / f).is_file()]
    if missing:
        raise GalleryError(
            f"{str(directory)!r} is not an index directory (no {', '.join(missing)}); build one "
            "with `pipeline build-gallery ... --out DIR`"
        )
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise GalleryError(
            f"{directory / MANIFEST_FILE}: format {manifest.get('format')!r} is not "
            f"{MANIFEST_FORMAT!r}; rebuild the index with this version's `pipeline build-gallery`"
        )
    index = import_faiss().read_index(str(directory / INDEX_FILE))
    gallery = Gallery(directory, index, pq.read_table(directory / ITEMS_FILE).to_pydict(), manifest)
    set_search_params(index, gallery.params)
    return gallery


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "config overrides (data.image_size, ...)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", default=None, help="a split of shards (directory or spec)")
    source.add_argument("--images", default=None, help="a folder of images (class sub-folders)")
    parser.add_argument("--out", required=True, help="index directory to write (must be new)")
    parser.add_argument("--kind", default="exact", help=f"one of {', '.join(KINDS)}")
    parser.add_argument("--batch-size", type=int, default=0, help="default: eval.batch_size")
    defaults = IndexParams()
    for name in ("hnsw_m", "ef_construction", "ef_search", "nlist", "pq_m", "nprobe", "train_size"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
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
    if out.exists() and any(out.iterdir()):
        raise GalleryError(
            f"--out {str(out)!r} exists and is not empty; pipeline build-gallery does not overwrite: "
            "pick a new directory"
        )
    model, cfg, checkpoint = load_weights_model(args.config, args.weights, args.overrides)
    batch_size = args.batch_size or cfg.eval.batch_size
    # Joins the job's group (none for one process) and always leaves it.
    with group.process_group():
        device = group.device()
        model.to(device)
        start = time.perf_counter()
        skipped: list[tuple[Path, str]] = []
        if args.shards:
            emb, items = _shard_gallery(model, args.shards, cfg.data, device, batch_size)
        else:
            emb, items, skipped = _folder_gallery(
                model, Path(args.images), cfg.data, device, batch_size
            )
        embed_s = time.perf_counter() - start
        if len(emb) == 0:  # the same on every rank (gathered)
            raise GalleryError(f"no image of {args.shards or args.images!r} could be embedded")
        if group.is_main_process():
            _build_and_write(
                out, emb, items, skipped, params, model, cfg, checkpoint, args, embed_s
            )
        collectives.barrier()  # all ranks participate: the index exists when every rank returns
    return 0


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
