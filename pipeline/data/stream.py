"""Streaming shards into training (P x K batches) and evaluation (every sample exactly once).

Training (``train_loader``)
---------------------------
Each rank runs V = ``sampler.streams_per_rank`` independent P x K streams per dataset; batch b
of an epoch comes from dataset ``mix[b]`` (drawn by the dataset weights, the same on every rank)
and from stream ``b mod V``. With W = num_workers (W divides V), DataLoader worker w runs the
streams v with v = start_step + w (mod W), so it yields batches start_step + w, + w + W, ...,
which is the DataLoader's round-robin order over workers; so the batches depend on
(sampler.seed, epoch, rank, world_size, V) only, not on num_workers.

Shards: every epoch each dataset's shard list is permuted (seeded by seed, epoch) and dealt out
round-robin to the ranks: disjoint across ranks. A rank's shards are dealt to its V streams the
same way when it has at least V of them (otherwise each stream reads all of the rank's shards in
its own order). A stream cycles over its shards endlessly, reshuffled every pass, so every rank
yields exactly ``steps_per_epoch - start_step`` batches whatever the shard sizes (no hang).

Randomness: one generator per stream (seed, epoch, rank, dataset, stream) for shard order,
groups and the shuffle buffer; each sample's augmentation draws from its own generator seeded by
(seed, epoch, rank, batch, row in the batch) (``TrainAugment``), never from a global RNG (the
caller's is untouched), so samples may be decoded on any thread in any order.

Where the work runs (``data.loader``): ``threads`` (default) has a producer thread form the
batches and num_workers threads of the training process decode and transform them in place
(``ThreadedTrainLoader``); ``processes`` runs the streams in DataLoader worker processes, as
below. Both give the same batches; threads copy no batch between processes.
``start_step=s`` replays the streams' first s batches without reading their images' pixels:
the skipped batches cost tar reading only.

Labels: a batch holds P contiguous blocks of K images of P distinct classes; the label of class
c of dataset d (its position in ``data.train``) is ``d * 2**32 + c`` (``namespaced_label``), so
mixed datasets never share a label and a single dataset keeps its own label values.

Evaluation (``eval_loader``)
----------------------------
Shards are dealt to ranks, then to workers, round-robin; where there are fewer shards than
ranks (or than a rank's workers), every reader reads them all and keeps every n-th sample. Each
sample appears once across all ranks and workers, tagged by its catalog row (its row in the
split's ``index.parquet``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config.schema import DataConfig, SamplerConfig
from pipeline.data import storage
from pipeline.data.catalog import expand_urls
from pipeline.data.dealing import (
    AUG,
    MIX,
    STREAM,
    rank_shards,
    stream_shards,
    streams_per_rank,
)
from pipeline.data.dealing import rng as _rng
from pipeline.data.pk import PASS_END, Group, PKBatcher, Raw, class_runs
from pipeline.data.threaded import BatchBuffers, ThreadedTrainLoader
from pipeline.data.transforms import (
    TrainAugment,
    decode_image,
    draft_side,
    normalise_into,
)
from pipeline.secrets import with_credentials

log = logging.getLogger(__name__)

LABEL_BITS = 32


def namespaced_label(dataset_index: int, label: int) -> int:
    """The training label of class ``label`` of dataset ``dataset_index`` (see module doc)."""
    return (dataset_index << LABEL_BITS) | label


def split_label(label: int) -> tuple[int, int]:
    """Inverse of ``namespaced_label``: (dataset index, class label)."""
    return label >> LABEL_BITS, label & ((1 << LABEL_BITS) - 1)


def tar_samples(url: str) -> Iterator[dict]:
    """The samples (member dicts) of one shard by webdataset's tar reader. Local files and
    ``s3://`` objects are streamed by :mod:`pipeline.data.storage` (reads retried and counted,
    a shard that cannot be read is an error); other URLs (``pipe:``, http) by webdataset."""
    import webdataset as wds

    if (not storage.is_s3(url) and "://" in url) or url.startswith("pipe:"):
        yield from wds.tarfile_samples([{"url": with_credentials(url)}])
        return
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with storage.open_read(url) as stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def read_shard(url: str) -> Iterator[Raw]:
    """The samples of one shard, undecoded (see :func:`tar_samples`)."""
    for sample in tar_samples(url):
        key = sample.get("__key__")
        if "jpg" not in sample or "cls" not in sample:
            raise ValueError(
                f"shard {url}: sample {key!r} has members {sorted(k for k in sample if not k.startswith('__'))}"
                ", needs jpg and cls; rewrite the shard with `pipeline make-shards` or check it "
                "with `pipeline validate-shards`"
            )
        try:
            label = int(sample["cls"])
        except ValueError:
            raise ValueError(
                f"shard {url}: sample {key!r} has cls {sample['cls'][:20]!r}, not an integer; "
                "check it with `pipeline validate-shards`"
            ) from None
        yield Raw(key, url, label, sample["jpg"])


def _endless_samples(urls: list[str], rng: np.random.Generator) -> Iterator[Raw | object]:
    while True:
        for i in rng.permutation(len(urls)):
            yield from read_shard(urls[i])
        yield PASS_END


class TrainStream(IterableDataset):
    """The training stream of one rank for one epoch; see ``train_loader`` and the module doc.

    ``output='tensors'`` yields (images, labels); ``output='raw'`` yields, per batch, the list of
    (url, key, namespaced label) of its P*K samples without decoding (for tests and diagnostics).
    """

    def __init__(
        self,
        data_cfg: DataConfig,
        sampler_cfg: SamplerConfig,
        *,
        rank: int,
        world_size: int,
        epoch: int,
        start_step: int = 0,
        output: str = "tensors",
        normalise: bool = True,
    ):
        super().__init__()
        steps = sampler_cfg.steps_per_epoch
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if not 0 <= start_step <= steps:
            raise ValueError(
                f"start_step={start_step}: must be in 0..sampler.steps_per_epoch ({steps})"
            )
        if epoch < 0:
            raise ValueError(f"epoch={epoch}: must be >= 0")
        if output not in ("tensors", "raw"):
            raise ValueError(f"output={output!r}: use 'tensors' or 'raw'")
        self.data_cfg, self.sampler_cfg = data_cfg, sampler_cfg
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.start_step, self.output, self.normalise = start_step, output, normalise
        self.pin_memory = False
        self._augment: TrainAugment | None = None
        self._min_side = 0
        # Before the workers fork: they inherit the settings and the shared retry count.
        storage.configure(data_cfg.storage)
        storage.share_retry_count()
        self.num_streams = streams_per_rank(data_cfg, sampler_cfg)
        self.urls = []
        for d, source in enumerate(data_cfg.train):
            urls = expand_urls(source.urls)
            if len(urls) < world_size:
                raise ValueError(
                    f"data.train[{d}] ({source.name}): {len(urls)} shards for {world_size} ranks; "
                    "every rank needs its own shards (disjoint within an epoch). Rewrite the "
                    "dataset with a smaller --samples-per-shard or use fewer ranks"
                )
            self.urls.append(urls)
        weights = np.array([s.weight for s in data_cfg.train], dtype=np.float64)
        self.mix = _rng(sampler_cfg.seed, MIX, epoch).choice(
            len(weights), size=steps, p=weights / weights.sum()
        )
        # position of batch b within its (dataset, stream) sequence
        self.position = np.zeros(steps, dtype=np.int64)
        counts: dict[tuple[int, int], int] = {}
        for b in range(steps):
            sid = (int(self.mix[b]), b % self.num_streams)
            self.position[b] = counts.get(sid, 0)
            counts[sid] = self.position[b] + 1

    def __len__(self) -> int:
        return self.sampler_cfg.steps_per_epoch - self.start_step

    def _batcher(self, dataset: int, stream: int) -> PKBatcher:
        s = self.sampler_cfg
        mine = rank_shards(
            self.urls[dataset],
            seed=s.seed,
            epoch=self.epoch,
            dataset=dataset,
            rank=self.rank,
            world_size=self.world_size,
        )
        urls = stream_shards(mine, stream, self.num_streams)
        rng = _rng(s.seed, STREAM, self.epoch, self.rank, dataset, stream)
        return PKBatcher(
            class_runs(_endless_samples(urls, rng)),
            classes_per_batch=s.classes_per_batch,
            samples_per_class=s.samples_per_class,
            buffer_groups=s.shuffle_buffer_groups,
            small_class_policy=s.small_class_policy,
            rng=rng,
            describe=(
                f"data.train[{dataset}] ({self.data_cfg.train[dataset].name}) rank {self.rank} "
                f"stream {stream} ({len(urls)} shards)"
            ),
        )

    def batch_indices(self, worker: int, num_workers: int) -> range:
        """The batches (epoch positions) that worker ``worker`` of ``num_workers`` yields."""
        return range(self.start_step + worker, self.sampler_cfg.steps_per_epoch, num_workers)

    def plans(
        self, worker: int = 0, num_workers: int = 1
    ) -> Iterator[tuple[int, int, list[Group]]]:
        """(batch b, dataset, its P groups of K undecoded samples) for the batches of
        ``batch_indices(worker, num_workers)``, in order; reads the shards, decodes nothing."""
        storage.configure(self.data_cfg.storage)  # again: a spawned worker starts afresh
        batchers: dict[tuple[int, int], PKBatcher] = {}
        produced: dict[tuple[int, int], int] = {}
        for b in self.batch_indices(worker, num_workers):
            sid = (int(self.mix[b]), b % self.num_streams)
            if sid not in batchers:
                batchers[sid] = self._batcher(*sid)
                produced[sid] = 0
            # Replay (undecoded) the batches of this stream that precede b: those before
            # start_step, which this worker does not yield.
            while produced[sid] < self.position[b]:
                batchers[sid].next_batch()
                produced[sid] += 1
            groups = batchers[sid].next_batch()
            produced[sid] += 1
            yield b, sid[0], groups

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for b, dataset, groups in self.plans(worker, num_workers):
            if self.output == "raw":
                yield [
                    (r.url, r.key, namespaced_label(dataset, r.label)) for g in groups for r in g
                ]
            else:
                images, labels = self.empty_batch(dataset, groups)
                for g in range(len(groups)):
                    self.fill_group(images, b, groups, g)
                yield images, labels

    def empty_batch(
        self, dataset: int, groups: list[Group], buffers: BatchBuffers | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(an uninitialised images tensor for the batch, its labels); from ``buffers`` when
        given (memory of an earlier batch that nobody holds any more)."""
        n, side = sum(len(g) for g in groups), self.data_cfg.image_size
        shape = (n, 3, side, side)
        dtype = torch.float32 if self.normalise else torch.uint8
        if buffers is not None:
            images = buffers.take(shape, dtype, self.pin_memory)
        else:
            images = torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)
        labels = torch.tensor(
            [namespaced_label(dataset, g[0].label) for g in groups for _ in g], dtype=torch.int64
        )
        return images, labels

    def fill_group(self, images: torch.Tensor, b: int, groups: list[Group], g: int) -> None:
        """Decode and transform group ``g`` of batch ``b`` into its rows of ``images``. Each
        sample's augmentation draws from its own generator, seeded by (sampler.seed, epoch,
        rank, batch, row in the batch): groups may be filled in any order, on any thread."""
        if self._augment is None:
            self._augment = TrainAugment(self.data_cfg)
            self._min_side = draft_side(self.data_cfg, train=True)
        row = sum(len(x) for x in groups[:g])
        for j, image in enumerate(_decode_group(groups[g], self._min_side)):
            rng = np.random.default_rng(
                [self.sampler_cfg.seed, AUG, self.epoch, self.rank, b, row + j]
            )
            image = self._augment(image, rng)
            if self.normalise:
                normalise_into(images[row + j], image)
            else:
                images[row + j].copy_(image)


def _decode_group(group: Group, min_side: int) -> list:
    """Decode K images; an undecodable one is replaced by another image of its group, with a
    warning naming shard and key (training goes on; `pipeline validate-shards` finds them all)."""
    images, bad = [], []
    for r in group:
        try:
            images.append(decode_image(r.data, min_side))
        except Exception as e:
            images.append(None)
            bad.append(r)
            log.warning(
                "shard %s: sample %s does not decode (%s); using another image of its class",
                r.url,
                r.key,
                e,
            )
    good = [im for im in images if im is not None]
    if not good:
        raise ValueError(
            f"no image of a class group decodes (shard {group[0].url}, keys "
            f"{[r.key for r in group]}); run `pipeline validate-shards` on the dataset"
        )
    return [im if im is not None else good[i % len(good)] for i, im in enumerate(images)]


def loader_of(dataset: IterableDataset, num_workers: int) -> DataLoader:
    # fork on Linux: workers start in milliseconds instead of re-importing torch (the default
    # in processes started by spawn, e.g. torch.multiprocessing.spawn); they never touch CUDA.
    context = "fork" if num_workers > 0 and sys.platform.startswith("linux") else None
    return DataLoader(
        dataset,
        batch_size=None,  # the streams yield whole batches
        num_workers=num_workers,
        multiprocessing_context=context,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        # The DataLoader draws its workers' base seed from this generator; without one it would
        # draw from (and so advance) the caller's global RNG. The streams seed themselves.
        generator=torch.Generator().manual_seed(0),
    )


def train_loader(
    data_cfg: DataConfig,
    sampler_cfg: SamplerConfig,
    *,
    rank: int,
    world_size: int,
    epoch: int,
    start_step: int = 0,
    normalise: bool = True,
) -> DataLoader | ThreadedTrainLoader:
    """P x K training batches of one rank for one epoch.

    Yields exactly ``sampler_cfg.steps_per_epoch - start_step`` tuples ``(images, labels)``:
    images float32 (P*K, 3, S, S) with S = data.image_size, ImageNet-normalised; labels int64
    (P*K,), P contiguous blocks of K images of P distinct classes, namespaced per dataset
    (``namespaced_label``). The same (sampler.seed, epoch, rank, world_size,
    sampler.streams_per_rank) gives bitwise the same batches, with any num_workers;
    ``start_step=s`` yields batches s, s+1, ... of the uninterrupted epoch. Ranks read disjoint
    shards within an epoch and all yield the same number of batches.

    ``normalise=False`` yields the images as uint8 (P*K, 3, S, S) instead, for the caller to
    normalise with ``pipeline.data.transforms.normalise_batch`` (e.g. on the GPU, after a 4x
    smaller host-to-device copy).

    ``data.loader=threads`` (with num_workers > 0) returns a ``ThreadedTrainLoader`` (decoding
    threads of this process, batches made in place); ``processes`` a DataLoader over worker
    processes; num_workers=0 a DataLoader that runs the stream in this thread. All three give
    the same batches.
    """
    stream = TrainStream(
        data_cfg,
        sampler_cfg,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        start_step=start_step,
        normalise=normalise,
    )
    if data_cfg.loader == "threads" and data_cfg.num_workers > 0:
        stream.pin_memory = torch.cuda.is_available()
        return ThreadedTrainLoader(stream, data_cfg.num_workers, prefetch=2 * data_cfg.num_workers)
    return loader_of(stream, data_cfg.num_workers)


def train_batches(
    data_cfg: DataConfig,
    sampler_cfg: SamplerConfig,
    *,
    rank: int,
    world_size: int,
    step: int,
    total_steps: int,
    normalise: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One rank's batches from global step ``step`` to ``total_steps``, epoch by epoch: the
    :func:`train_loader` of each epoch, from the step within it. Raises RuntimeError if an
    epoch's stream ends early (every rank must yield the same number of batches)."""
    spe = sampler_cfg.steps_per_epoch
    while step < total_steps:
        epoch, start = divmod(step, spe)
        loader = train_loader(
            data_cfg,
            sampler_cfg,
            rank=rank,
            world_size=world_size,
            epoch=epoch,
            start_step=start,
            normalise=normalise,
        )
        batches = iter(loader)
        for _ in range(start, spe):
            item = next(batches, None)
            if item is None:
                raise RuntimeError(
                    f"the training stream of rank {rank} ended at step {step} of epoch "
                    f"{epoch}, before sampler.steps_per_epoch={spe}: every rank must yield the "
                    "same number of batches (pipeline.data.stream.train_loader)"
                )
            yield item
            step += 1
