"""Distributed extraction: every rank embeds its part of a split, every rank gets all rows.

Each sample is tagged with its catalog row (its row in the split's ``index.parquet``), so the
gathered embeddings are put back in catalog-row order and a sample read twice is detected.

Shape legend: N samples, D embedding dims.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config.schema import DataConfig
from pipeline.data.eval_stream import eval_loader
from pipeline.distributed import collectives, group
from pipeline.eval.protocols import PLAIN, Embeddings, Extraction


def _embedder(model: torch.nn.Module, unnormalized: bool) -> Any:
    if not unnormalized:
        return model
    embed = getattr(model, "embed_unnormalized", None)
    if embed is None:
        raise ValueError(
            f"the evaluation needs the embedding before its L2 normalisation, which "
            f"{type(model).__name__} does not expose (embed_unnormalized); evaluate a "
            "pipeline.model.EmbeddingModel"
        )
    return embed


def extract_embeddings(
    model: torch.nn.Module,
    urls: str,
    data_cfg: DataConfig,
    *,
    device: torch.device | str,
    batch_size: int,
    progress: bool = True,
    extraction: Extraction = PLAIN,
) -> Embeddings:
    """Embed every sample of ``urls`` once, split over the ranks; every rank gets all rows.

    All ranks participate. Raises ValueError if a catalog row arrives twice (shards listed
    twice in ``urls``) or the set is empty. ``extraction``: mirrored images too, and the
    embedding before the model's L2 normalisation (see :class:`Extraction`).
    """
    rank, world = group.get_rank(), group.get_world_size()
    loader = eval_loader(urls, data_cfg, rank=rank, world_size=world, batch_size=batch_size)
    dtype = next(model.parameters()).dtype  # bf16 under a DeepSpeed bf16 engine
    was_training = model.training
    model.eval()
    embed = _embedder(model, extraction.unnormalized)
    embs, flips, labels, indices = [], [], [], []
    bar = tqdm(desc="embedding", unit="img", disable=not (progress and rank == 0))
    try:
        with torch.no_grad():
            for images, lab, idx in loader:
                x = images.to(device, dtype=dtype, non_blocking=True)
                embs.append(embed(x).float().cpu().numpy())
                if extraction.flip:  # the mirror of the image the model sees (width is dim 3)
                    flips.append(embed(torch.flip(x, dims=[3])).float().cpu().numpy())
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
    flip = None
    if extraction.flip:
        flip = np.concatenate(flips) if flips else np.zeros((0, dim), np.float32)
        flip = collectives.all_gather_rows(flip)  # all ranks participate
    if len(idx) == 0:
        raise ValueError(f"eval shards {urls!r} hold no samples; check data.eval_urls")
    e, repeated = sort_by_row(emb, lab, idx, flip)
    if len(repeated):
        raise ValueError(
            f"data.eval_urls={urls!r}: catalog row {int(repeated[0])} (and "
            f"{len(repeated) - 1} more) was read twice; list every shard once"
        )
    return e


def sort_by_row(
    emb: np.ndarray, labels: np.ndarray, row: np.ndarray, flip: np.ndarray | None = None
) -> tuple[Embeddings, np.ndarray]:
    """The embeddings in catalog-row order, and the catalog rows that occur more than once."""
    order = np.argsort(row, kind="stable")
    emb, labels, row = emb[order], labels[order], row[order]
    flip = None if flip is None else flip[order]
    return Embeddings(emb, labels, row, flip), row[1:][row[1:] == row[:-1]]
