"""How shards are dealt to ranks and streams: the one rule that training streams and preflight
share. Torch-free on purpose: preflight runs it on a login node in a fraction of a second.

Every rank reads its own shards of each dataset in each epoch (a permutation seeded by
(sampler.seed, epoch, dataset), dealt round-robin over the ranks, so the ranks' shards are
disjoint); a rank's shards are dealt round-robin over its V streams.
"""

from __future__ import annotations

import numpy as np

from pipeline.config.schema import DataConfig, SamplerConfig

# Seed-sequence tags keep the random streams of different purposes apart.
SHARDS, STREAM, MIX, AUG = 1, 2, 3, 4


def rng(seed: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng([seed, *ids])


def streams_per_rank(data_cfg: DataConfig, sampler_cfg: SamplerConfig) -> int:
    """V: sampler.streams_per_rank, or max(1, data.num_workers) when it is 0."""
    v = sampler_cfg.streams_per_rank or max(1, data_cfg.num_workers)
    if data_cfg.num_workers > 0 and v % data_cfg.num_workers:
        raise ValueError(
            f"sampler.streams_per_rank={v} is not a multiple of data.num_workers="
            f"{data_cfg.num_workers}: each data worker must own whole streams; set "
            f"sampler.streams_per_rank to a multiple of {data_cfg.num_workers} (or 0: one "
            "stream per worker)"
        )
    return v


def rank_shards(
    urls: list[str], *, seed: int, epoch: int, dataset: int, rank: int, world_size: int
) -> list[str]:
    """The shards of one dataset that ``rank`` reads in ``epoch`` (disjoint across ranks)."""
    perm = rng(seed, SHARDS, dataset, epoch).permutation(len(urls))
    return [urls[i] for i in perm[rank::world_size]]


def stream_shards(mine: list[str], stream: int, num_streams: int) -> list[str]:
    """Stream ``stream``'s part of a rank's shards (all of them when there are too few)."""
    return mine[stream::num_streams] if len(mine) >= num_streams else list(mine)
