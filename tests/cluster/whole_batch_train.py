"""Train in ONE process on the global batches that RANKS ranks would read, for equality tests.

    python -m tests.cluster.whole_batch_train RANKS CONFIG [key=value ...]

CONFIG is the multi-rank run's config (P classes per rank). This process trains with
``sampler.classes_per_batch = RANKS * P`` and ``pipeline.data.stream.train_loader`` replaced by
one that yields, per step, the batches of ranks 0..RANKS-1 (the same ``TrainStream`` the job's
ranks ran, with their (seed, epoch, rank, world size)) concatenated in rank order: exactly the
global batch the loss all-gathers. Everything else is ``pipeline.train.entry.train``.

Test-only: the replacement is the one hook; a trainer that stops reading
``pipeline.data.stream.train_loader`` makes this script fail (it checks the hook was used).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

import pipeline.data.stream as stream
from pipeline.config.load import load_config
from pipeline.data.stream import TrainStream


def main(ranks: int, config: str, overrides: list[str]) -> None:
    per_rank = load_config(config, overrides)
    p = per_rank.sampler.classes_per_batch
    whole = replace(
        per_rank,
        sampler=replace(
            per_rank.sampler,
            classes_per_batch=ranks * p,
            # Only validated here (>= classes_per_batch); the batches come from per-rank streams.
            shuffle_buffer_groups=max(per_rank.sampler.shuffle_buffer_groups, ranks * p),
        ),
    )
    calls = []

    def global_batches(data_cfg, sampler_cfg, *, rank, world_size, epoch, start_step=0, **kw):
        assert (rank, world_size) == (0, 1), "whole_batch_train runs as one process"
        calls.append(epoch)
        normalise = kw.get("normalise", True)
        parts = [
            TrainStream(
                per_rank.data,
                per_rank.sampler,
                rank=r,
                world_size=ranks,
                epoch=epoch,
                start_step=start_step,
                normalise=normalise,
            )
            for r in range(ranks)
        ]
        for batches in zip(*parts, strict=True):
            yield torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    stream.train_loader = global_batches
    from pipeline.train.entry import train

    train(whole)
    if not calls:
        raise RuntimeError("the trainer never called pipeline.data.stream.train_loader")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
