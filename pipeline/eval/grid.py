"""The retrieval protocols' figure: a few queries with their nearest neighbours, read back
from the eval shards.

Shape legend: N samples, D embedding dims.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config.schema import DataConfig
from pipeline.data.catalog import read_index, split_dir
from pipeline.eval.metrics import l2_normalize
from pipeline.plots import retrieval_grid_png

log = logging.getLogger(__name__)

GRID_QUERIES = 8
GRID_NEIGHBOURS = 5


def _grid_queries(labels_N: np.ndarray, n: int) -> np.ndarray:
    """``n`` queries spread evenly over the rows that have a positive (deterministic)."""
    _, inverse, counts = np.unique(labels_N, return_inverse=True, return_counts=True)
    rows = np.flatnonzero(counts[inverse.reshape(-1)] > 1)
    return rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)]


def _read_images(data_cfg: DataConfig, index: set[int], side: int = 96) -> dict[int, np.ndarray]:
    """Thumbnails of the samples with these global indices, read from their shards."""
    # The shard reader and decoder bring torch: imported when a grid is drawn, so that the
    # protocol registry, which the config rules consult when a config loads, stays torch-free.
    from pipeline.data.stream import read_shard
    from pipeline.data.transforms import decode_image

    table = read_index(data_cfg.eval_urls).select(["index", "key", "shard"]).to_pydict()
    where = {i: (table["shard"][i], table["key"][i]) for i in index if i < len(table["index"])}
    root = split_dir(data_cfg.eval_urls)
    images: dict[int, np.ndarray] = {}
    for shard in sorted({s for s, _ in where.values()}):
        wanted = {k: i for i, (s, k) in where.items() if s == shard}
        for raw in read_shard(str(root / shard)):
            if raw.key in wanted:
                img = decode_image(raw.data)
                img = img.resize((side, side), Image.BILINEAR)
                images[wanted[raw.key]] = np.asarray(img)
    return images


def retrieval_grid(
    emb_ND: np.ndarray, labels_N: np.ndarray, row_N: np.ndarray, data_cfg: DataConfig, path: Path
) -> Path | None:
    """Queries with their top-5 neighbours (green: same label, red: not), or None (and a
    printed reason) when the images cannot be read back (remote shards). Row r is the sample
    with catalog row ``row_N[r]``."""
    q_rows = _grid_queries(labels_N, GRID_QUERIES)
    emb = l2_normalize(emb_ND)
    sims = emb[q_rows] @ emb.T  # a few rows of the similarity matrix
    sims[np.arange(len(q_rows)), q_rows] = -np.inf  # the query itself, by index
    order = np.lexsort((np.broadcast_to(np.arange(emb.shape[0]), sims.shape), -sims), axis=1)
    nb_rows = order[:, :GRID_NEIGHBOURS]
    wanted = {int(row_N[r]) for r in np.concatenate([q_rows, nb_rows.ravel()])}
    try:
        images = _read_images(data_cfg, wanted)
    except (FileNotFoundError, ValueError, OSError) as err:
        log.warning("no retrieval grid: cannot read the eval images back (%s)", err)
        return None
    missing = wanted - images.keys()
    if missing:
        log.warning("no retrieval grid: %d images not found in their shards", len(missing))
        return None
    return retrieval_grid_png(
        [images[int(row_N[q])] for q in q_rows],
        [[images[int(row_N[r])] for r in row] for row in nb_rows],
        [[bool(labels_N[r] == labels_N[q]) for r in row] for q, row in zip(q_rows, nb_rows)],
        path,
        titles=[f"row {int(row_N[q])}" for q in q_rows],
    )
