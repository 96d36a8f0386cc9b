"""A gallery's index directory on disk: writing it and reading it back.

    index.faiss      the FAISS index; row i is gallery item i
    items.parquet    one row per item: row, key, source (shard file or image path), label,
                     class_name (label -1 / class_name null where unknown)
    manifest.json    kind and search parameters, size, dimension, the checkpoint (a checkpoint
                     root resolved to the tag read) and its architecture, the weights'
                     record (``weights``: identity, path, run id, step;
                     ``pipeline.weights.WeightsOrigin``), the preprocessing sizes, recall@10
                     of a compressed index

Built by ``pipeline build-gallery`` (``pipeline.serve.gallery``), read by ``pipeline search``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.eval.knn import import_faiss
from pipeline.serve.gallery_index import GalleryError, IndexParams, set_search_params

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.parquet"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "smoothap-gallery-v1"


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


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """An index directory's manifest (GalleryError if its format is not this version's)."""
    file = Path(directory) / MANIFEST_FILE
    manifest = json.loads(file.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise GalleryError(
            f"{file}: format {manifest.get('format')!r} is not {MANIFEST_FORMAT!r}; rebuild "
            "the index with this version's `pipeline build-gallery`"
        )
    return manifest


def read_gallery(directory: str | Path) -> Gallery:
    """Read an index directory written by ``pipeline build-gallery`` (GalleryError if it is not one)."""
    directory = Path(directory)
    missing = [f for f in (INDEX_FILE, ITEMS_FILE, MANIFEST_FILE) if not (directory / f).is_file()]
    if missing:
        raise GalleryError(
            f"{str(directory)!r} is not an index directory (no {', '.join(missing)}); build one "
            "with `pipeline build-gallery ... --out DIR`"
        )
    manifest = read_manifest(directory)
    index = import_faiss().read_index(str(directory / INDEX_FILE))
    gallery = Gallery(directory, index, pq.read_table(directory / ITEMS_FILE).to_pydict(), manifest)
    set_search_params(index, gallery.params)
    return gallery
