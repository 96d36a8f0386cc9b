"""The evaluation stream: every sample of an eval split exactly once across ranks and workers,
in batches ``(images, labels, global row)``, decoded and transformed as evaluation sees them.

Shards are read through :func:`pipeline.data.stream.tar_samples` (local files and ``s3://``
objects alike, reads retried and counted by :mod:`pipeline.data.storage`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config.schema import DataConfig
from pipeline.data import storage
from pipeline.data.catalog import expand_urls
from pipeline.data.pk import Raw
from pipeline.data.stream import loader_of, tar_samples
from pipeline.data.transforms import decode_image, draft_side, eval_geometry, normalise_batch


def eval_reader_part(
    num_shards: int, rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[list[int], tuple[int, int], tuple[int, int]]:
    """What one eval reader reads: (shard ids, (rank modulus, residue), (worker modulus,
    residue)). A reader keeps the c-th sample it reads if c % m1 == r1 and, counting only those,
    the c'-th if c' % m2 == r2; so every sample is kept by exactly one (rank, worker)."""
    shards = list(range(num_shards))
    if num_shards >= world_size:
        shards, rank_mod = shards[rank::world_size], (1, 0)
    else:
        rank_mod = (world_size, rank)
    if len(shards) >= num_workers:
        shards, worker_mod = shards[worker::num_workers], (1, 0)
    else:
        worker_mod = (num_workers, worker)
    return shards, rank_mod, worker_mod


class EvalStream(IterableDataset):
    """Batches (images, labels, catalog row) of one rank's part of an eval set."""

    def __init__(
        self,
        urls: str,
        data_cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        normalise: bool = True,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        storage.configure(data_cfg.storage)
        storage.share_retry_count()
        self.urls = expand_urls(urls)
        self.data_cfg = data_cfg
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.normalise = normalise

    def _samples(self, worker: int, num_workers: int) -> Iterator[tuple[Raw, int]]:
        shards, (m1, r1), (m2, r2) = eval_reader_part(
            len(self.urls), self.rank, self.world_size, worker, num_workers
        )
        c1 = c2 = 0
        for s in shards:
            for sample in tar_samples(self.urls[s]):
                keep = c1 % m1 == r1
                c1 += 1
                if not keep:
                    continue
                keep = c2 % m2 == r2
                c2 += 1
                if keep:
                    yield _eval_sample(self.urls[s], sample)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        storage.configure(self.data_cfg.storage)
        transform = eval_geometry(self.data_cfg)
        min_side = draft_side(self.data_cfg, train=False)
        images, labels, indices = [], [], []
        for raw, index in self._samples(worker, num_workers):
            images.append(transform(decode_image(raw.data, min_side)))
            labels.append(raw.label)
            indices.append(index)
            if len(images) == self.batch_size:
                yield _eval_batch(images, labels, indices, self.normalise)
                images, labels, indices = [], [], []
        if images:
            yield _eval_batch(images, labels, indices, self.normalise)


def _eval_sample(url: str, sample: dict) -> tuple[Raw, int]:
    key = sample.get("__key__")
    try:
        meta = json.loads(sample["json"])
        index = int(meta["index"])
        label = int(sample["cls"])
        data = sample["jpg"]
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(
            f"shard {url}: sample {key!r} lacks a valid jpg, cls or json['index'] ({e!r}); "
            "eval shards must be written by `pipeline make-shards`; check them with "
            "`pipeline validate-shards`"
        ) from None
    return Raw(key, url, label, data), index


def _eval_batch(
    images, labels, indices, normalise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        normalise_batch(images) if normalise else torch.stack(images),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(indices, dtype=torch.int64),
    )


def eval_loader(
    urls: str,
    data_cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    normalise: bool = True,
) -> DataLoader:
    """One rank's part of an eval set: batches ``(images, labels int64, index int64)``.

    Images as in ``eval_transform`` (float32 (B, 3, S, S)); labels are the shards' ``cls``
    (not namespaced); ``index`` is each sample's catalog row (its row in the split's
    ``index.parquet``, see ``pipeline.data.catalog.read_index``). Across all ranks and workers
    every sample of ``urls`` appears exactly once; a rank may get fewer (or no) samples than
    another. Batches hold ``batch_size`` samples, the last of each worker fewer.
    ``normalise=False``: uint8 images, as in ``train_loader``.
    """
    stream = EvalStream(
        urls, data_cfg, rank=rank, world_size=world_size, batch_size=batch_size, normalise=normalise
    )
    return loader_of(stream, data_cfg.num_workers)
