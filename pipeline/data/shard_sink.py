"""The shards of one split as they are written, and the tables written beside them.

``ShardSink`` writes prepared images as samples ``{__key__, jpg, cls, json}`` into WebDataset
tar shards, class-contiguous (a shard is closed early rather than split a class that would not
fit), and keeps each sample's index row; ``write_tables`` then writes ``index.parquet`` (with the
shards' sizes and MD5s and the face-crop record), ``sizes.json`` and the dataset's extra files.
Listing, preparing, checking and swapping in the split are ``pipeline.data.writer``'s.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.catalog import INDEX_FILE, SHARD_BYTES, SHARD_MD5, SIZES_FILE, shard_pattern
from pipeline.data.faces import CATALOG_KEY, NO_CROP
from pipeline.data.items import SourceItem
from pipeline.data.storage_ops import md5_file

INDEX_COLUMNS = (
    "index",
    "key",
    "shard",
    "position",
    "label",
    "class_name",
    "split",
    "bytes",
    "width",
    "height",
    "source",
)


@dataclass
class ShardSink:
    """The shards of one split being written, class-contiguous, and their index rows."""

    partial_dir: Path
    name: str
    split: str
    samples_per_shard: int
    labels: dict[str, int]  # class name -> label
    class_sizes: dict[str, int]  # class name -> samples to write
    shard_names: list[str] = field(default_factory=list)  # closed shards, in write order
    sizes: dict[str, int] = field(default_factory=dict)  # shard name -> samples
    rows: list[dict[str, Any]] = field(default_factory=list)  # index rows, in write order
    total_bytes: int = 0
    writer: Any = None  # the webdataset ShardWriter, opened with the first sample
    current_class: str | None = None

    def add(self, item: SourceItem, data: bytes, width: int, height: int) -> None:
        """Write one prepared image as the next sample and record its index row."""
        self._place(item.class_name)
        index = len(self.rows)
        key = f"{index:09d}"
        shard = os.path.basename(self.writer.fname)
        meta = {
            "dataset": self.name,
            "class_name": item.class_name,
            "source": item.source,
            "split": self.split,
            "index": index,
            **item.meta,
        }
        self.writer.write(
            {
                "__key__": key,
                "jpg": data,
                "cls": str(self.labels[item.class_name]).encode("ascii"),
                "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
            }
        )
        self.rows.append(
            {
                "index": index,
                "key": key,
                "shard": shard,
                "position": self.writer.count - 1,
                "label": self.labels[item.class_name],
                "class_name": item.class_name,
                "split": self.split,
                "bytes": len(data),
                "width": width,
                "height": height,
                "source": item.source,
                **item.meta,
            }
        )
        self.sizes[shard] = self.sizes.get(shard, 0) + 1
        self.total_bytes += len(data)

    def _place(self, class_name: str) -> None:
        """Open the first shard, or start the next one where this sample must not go into the
        current one."""
        if self.writer is None:
            import webdataset as wds

            self.writer = wds.ShardWriter(
                shard_pattern(self.partial_dir, self.name, self.split),
                maxcount=sys.maxsize,
                maxsize=float("inf"),
                verbose=0,
                # An int mtime: reproducible bytes, and no PAX header per member (a float
                # mtime forces one), which halves the header parsing of every reader.
                mtime=0,
                post=lambda fname: self.shard_names.append(os.path.basename(fname)),
            )
        elif class_name != self.current_class:
            # Close the shard rather than split a class that would not fit into it.
            count = self.writer.count
            if count and count + self.class_sizes[class_name] > self.samples_per_shard:
                self.writer.next_stream()
        elif self.writer.count >= self.samples_per_shard:  # a class larger than a shard
            self.writer.next_stream()
        self.current_class = class_name

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_tables(
    partial_dir: Path,
    items: list[SourceItem],
    sink: ShardSink,
    extra_files: dict[str, Callable[[Path], None]] | None,
    crop: dict[str, Any] | None = None,
) -> None:
    """Write index.parquet (with the crop record in its metadata), sizes.json and the extra
    files of the written shards."""
    meta_keys = sorted({k for item in items for k in item.meta} - set(INDEX_COLUMNS))
    columns = {c: [r.get(c) for r in sink.rows] for c in (*INDEX_COLUMNS, *meta_keys)}
    # Each shard's size and MD5, so that a copy (an object store's above all) can be checked.
    checks = {n: (os.path.getsize(partial_dir / n), md5_file(partial_dir / n)) for n in sink.sizes}
    columns[SHARD_BYTES] = [checks[r["shard"]][0] for r in sink.rows]
    columns[SHARD_MD5] = [checks[r["shard"]][1] for r in sink.rows]
    # The face columns' types are shared with their readers (x1, y1, ..., x5, y5 in the source
    # image's pixels; null where the dataset gives none), whatever the Python values are.
    types = {"landmarks_5pt": pa.list_(pa.float32()), "det_score": pa.float32()}
    arrays = {c: pa.array(v, types.get(c)) for c, v in columns.items()}
    table = pa.table(arrays).replace_schema_metadata(
        {CATALOG_KEY: json.dumps(crop or NO_CROP, sort_keys=True)}
    )
    pq.write_table(table, partial_dir / INDEX_FILE)
    # Shard order = write order, so sizes.json also lists the shards in global-index order.
    assert list(sink.sizes) == sink.shard_names, (list(sink.sizes), sink.shard_names)
    (partial_dir / SIZES_FILE).write_text(json.dumps(sink.sizes, indent=1) + "\n")
    for fname, write in (extra_files or {}).items():
        write(partial_dir / fname)
