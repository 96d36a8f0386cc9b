"""The train loader in 2 real gloo processes x 2 DataLoader workers: equal step counts (a
collective every step, as in training), disjoint shards, and the same batches as computing each
rank's loader in one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.data.stream import TrainStream, train_loader
from tests.data_helpers import cfgs
from tests.dist_helpers import run_distributed

STEPS = 6


def _worker(rank: int, world_size: int, split: str, out: str) -> None:
    from pipeline.distributed import collectives, group

    assert (group.get_rank(), group.get_world_size()) == (rank, world_size)
    data, sampler = cfgs(split, p=3, k=2, steps=STEPS, workers=2)
    images, labels, gathered = [], [], []
    for x, y in train_loader(data, sampler, rank=group.get_rank(), world_size=world_size, epoch=1):
        images.append(x)
        labels.append(y)
        # all ranks participate, every step: a rank with fewer batches would hang here
        gathered.append(collectives.all_gather_nograd(y))
    steps = collectives.all_gather_nograd(torch.tensor([len(labels)]))
    stream = TrainStream(data, sampler, rank=rank, world_size=world_size, epoch=1, output="raw")
    urls = sorted({u for batch in stream for u, _, _ in batch})
    torch.save(
        {"images": images, "labels": labels, "gathered": gathered, "steps": steps, "urls": urls},
        Path(out) / f"rank{rank}.pt",
    )


@pytest.mark.distributed
def test_two_processes_two_workers_match_single_process(tmp_path, synthetic_split):
    split = synthetic_split(classes=16, per_class=4, samples_per_shard=8)
    run_distributed(_worker, 2, str(split), str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["steps"].tolist() for r in results] == [[STEPS, STEPS]] * 2
    assert not set(results[0]["urls"]) & set(results[1]["urls"])
    data, sampler = cfgs(str(split), p=3, k=2, steps=STEPS, workers=0, streams=2)
    for rank, result in enumerate(results):
        expected = list(train_loader(data, sampler, rank=rank, world_size=2, epoch=1))
        assert len(expected) == STEPS
        for (x, y), x2, y2 in zip(expected, result["images"], result["labels"]):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    for step in range(STEPS):
        both = torch.cat([results[0]["labels"][step], results[1]["labels"][step]])
        assert torch.equal(results[0]["gathered"][step], both)
