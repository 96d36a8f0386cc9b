"""Distributed extraction: every rank embeds its part of a split, every rank gets all rows.

Each sample is tagged with its global index (its row in the split's ``index.parquet``), so the
gathered rows are put back in index order and a sample read twice is detected.

Shape legend: N samples, D embedding dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config.schema import DataConfig
from pipeline.data.stream import eval_loader
from pipeline.distributed import collectives, group


@dataclass
class Embeddings:
    """The whole eval set, rows sorted by global index (the row in the split's index.parquet)."""

    emb_ND: np.ndarray
    labels_N: np.ndarray
    index_N: np.ndarray


def extract_embeddings(
    model: torch.nn.Module,
    urls: str,
    data_cfg: DataConfig,
    *,
    device: torch.device | str,
    batch_size: int,
    progress: bool = True,
) -> Embeddings:
    """Embed every sample of ``urls`` once, split over the ranks; every rank gets all rows.

    All ranks participate. Raises ValueError if a sample index arrives twice (shards listed
    twice in ``urls``) or the set is empty.
    """
    rank, world = group.get_rank(), group.get_world_size()
    loader = eval_loader(urls, data_cfg, rank=rank, world_size=world, batch_size=batch_size)
    dtype = next(model.parameters()).dtype  # bf16 under a DeepSpeed bf16 engine
    was_training = model.training
    model.eval()
    embs, labels, indices = [], [], []
    bar = tqdm(desc="embedding", unit="img", disable=not (progress and rank == 0))
    try:
        with torch.no_grad():
            for images, lab, idx in loader:
                out = model(images.to(device, dtype=dtype, non_blocking=True))
                embs.append(out.float().cpu().numpy())
                labels.append(lab.numpy())
                indices.append(idx.numpy())
                bar.update(len(idx) * world)  # an estimate of all ranks' progress
    finally:
        bar.close()
        model.train(was_training)
    # A rank may receive no samples; it still needs the embedding width to join the gather.
    dim = embs[0].shape[1] if embs else 0
    dim = int(collectives.all_gather_nograd(torch.tensor([dim], device=group.device())).max())
    emb = np.concatenate(embs) if embs else np.zeros((0, dim), np.float32)
    lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    idx = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    # All ranks participate, a rank without samples too.
    emb, lab, idx = (collectives.all_gather_rows(a) for a in (emb, lab, idx))
    if len(idx) == 0:
        raise ValueError(f"eval shards {urls!r} hold no samples; check data.eval_urls")
    e, repeated = sort_by_index(emb, lab, idx)
    if len(repeated):
        raise ValueError(
            f"data.eval_urls={urls!r}: sample index {int(repeated[0])} (and "
            f"{len(repeated) - 1} more) was read twice; list every shard once"
        )
    return e


def sort_by_index(
    emb: np.ndarray, labels: np.ndarray, index: np.ndarray
) -> tuple[Embeddings, np.ndarray]:
    """Rows in global-index order, and the index values that occur more than once."""
    order = np.argsort(index, kind="stable")
    emb, labels, index = emb[order], labels[order], index[order]
    return Embeddings(emb, labels, index), index[1:][index[1:] == index[:-1]]
