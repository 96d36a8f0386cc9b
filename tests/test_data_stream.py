"""Streaming: P x K batches from real shards, determinism, resume, rank/worker splits, mixing,
and the eval loader's exactly-once guarantee."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.data.catalog import expand_urls, read_index
from pipeline.data.eval_stream import eval_loader
from pipeline.data.stream import (
    TrainStream,
    rank_shards,
    split_label,
    stream_shards,
    train_loader,
)
from pipeline.data.transforms import eval_transform
from tests.data_helpers import cfgs


@pytest.fixture(scope="module")
def split(synthetic_split):
    """24 classes x 5 images, 3 whole classes a shard: 8 shards."""
    return synthetic_split(classes=24, per_class=5, samples_per_shard=15)


@pytest.fixture(scope="module")
def uneven(synthetic_split):
    """8 shards of different sizes, classes of 2..9 images."""
    sizes = [2 + (3 * c) % 8 for c in range(14)]
    return synthetic_split(
        classes=14,
        per_class_sizes=sizes,
        samples_per_shard=14,
        seed=5,
    )


def _raw(data, sampler, **kw) -> list[list[tuple]]:
    stream = TrainStream(data, sampler, output="raw", **kw)
    return list(DataLoader(stream, batch_size=None, num_workers=data.num_workers))


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b)
    )


def test_batches_are_p_blocks_of_k_of_distinct_classes(split):
    data, sampler = cfgs(str(split), p=4, k=3, steps=40)
    rows = {r["key"]: r for r in read_index(str(split)).to_pylist()}
    batches = list(train_loader(data, sampler, rank=0, world_size=1, epoch=0))
    assert len(batches) == 40
    raw = _raw(data, sampler, rank=0, world_size=1, epoch=0)
    seen = Counter()
    for (images, labels), samples in zip(batches, raw):
        assert images.shape == (12, 3, 16, 16) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.shape == (12,)
        blocks = labels.view(4, 3)
        assert (blocks == blocks[:, :1]).all() and len(set(blocks[:, 0].tolist())) == 4
        for (_, key, label), lab in zip(samples, labels.tolist()):
            assert rows[key]["label"] == label == lab  # the label is the sample's own
        for b in range(4):  # classes have 5 >= K images: a block holds K distinct images
            assert len({key for _, key, _ in samples[3 * b : 3 * b + 3]}) == 3
        seen.update(labels.tolist())
    assert set(seen) == set(range(24))  # every class turns up
    # ImageNet normalisation: values leave [0, 1]
    assert batches[0][0].min() < -0.5 and batches[0][0].max() > 1.0


def test_bitwise_deterministic_and_independent_of_num_workers(split):
    base = dict(rank=0, world_size=1, epoch=0)
    data0, sampler = cfgs(str(split), steps=12, streams=2, workers=0)
    data2, _ = cfgs(str(split), steps=12, streams=2, workers=2)
    state = torch.get_rng_state()
    first = list(train_loader(data0, sampler, **base))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert _equal(first, list(train_loader(data2, sampler, **base)))
    assert _equal(first, list(train_loader(data0, sampler, **base)))
    other_epoch = list(train_loader(data0, sampler, rank=0, world_size=1, epoch=1))
    assert not _equal(first, other_epoch)
    _, sampler_seed = cfgs(str(split), steps=12, streams=2, seed=1)
    assert not _equal(first, list(train_loader(data0, sampler_seed, **base)))


@pytest.mark.parametrize("start", [1, 5, 11, 12])
def test_start_step_yields_the_tail_of_the_epoch(split, start):
    data, sampler = cfgs(str(split), steps=12, streams=2, workers=2)
    full = list(train_loader(data, sampler, rank=1, world_size=2, epoch=3))
    tail = train_loader(data, sampler, rank=1, world_size=2, epoch=3, start_step=start)
    assert len(tail) == 12 - start
    assert _equal(full[start:], list(tail))


def test_two_ranks_two_workers_equal_counts_and_disjoint_shards(split):
    data, sampler = cfgs(str(split), steps=10, workers=2)  # V = 2 streams per rank
    urls = expand_urls(str(split))
    for epoch in (0, 1):
        used = {}
        for rank in (0, 1):
            batches = _raw(data, sampler, rank=rank, world_size=2, epoch=epoch)
            assert len(batches) == 10
            used[rank] = {url for batch in batches for url, _, _ in batch}
            mine = rank_shards(urls, seed=0, epoch=epoch, dataset=0, rank=rank, world_size=2)
            assert used[rank] <= set(mine) and len(mine) == 4
            # batch b comes from stream b % 2, which reads only its own 2 shards
            for b, batch in enumerate(batches):
                assert {u for u, _, _ in batch} <= set(stream_shards(mine, b % 2, 2))
        assert not used[0] & used[1]


def test_uneven_shards_give_every_rank_the_same_number_of_batches(uneven):
    sizes = Counter(read_index(str(uneven)).column("shard").to_pylist())
    assert len(sizes) == 8 and len(set(sizes.values())) > 1  # 3 ranks: 3, 3 and 2 shards
    data, sampler = cfgs(str(uneven), p=2, k=4, steps=25, workers=0, buffer=6)
    counts = [
        len(list(train_loader(data, sampler, rank=r, world_size=3, epoch=0))) for r in range(3)
    ]
    assert counts == [25, 25, 25]


def test_datasets_mix_by_weight_with_namespaced_labels(split, uneven):
    data, sampler = cfgs([str(split), str(uneven)], p=3, k=2, steps=200, weights=[3.0, 1.0])
    per_rank = [_raw(data, sampler, rank=r, world_size=2, epoch=0) for r in (0, 1)]
    mix = [[{split_label(lab)[0] for _, _, lab in batch} for batch in b] for b in per_rank]
    assert all(len(s) == 1 for s in mix[0])  # one dataset per batch
    assert mix[0] == mix[1]  # the same dataset on every rank at a step
    share = sum(s == {0} for s in mix[0]) / 200
    assert 0.68 < share < 0.82
    rows = {1: {r["key"]: r["label"] for r in read_index(str(uneven)).to_pylist()}}
    for _, key, lab in (x for batch in per_rank[0] for x in batch):
        d, c = split_label(lab)
        assert lab == (d << 32) + c
        if d == 1:
            assert rows[1][key] == c


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (3, 1), (5, 2)])
def test_eval_loader_yields_every_sample_exactly_once(split, world, workers):
    data, _ = cfgs(str(split), workers=workers)
    rows = read_index(str(split)).to_pylist()
    indices, checked = [], 0
    for rank in range(world):
        for images, labels, index in eval_loader(
            str(split), data, rank=rank, world_size=world, batch_size=7
        ):
            assert images.shape[1:] == (3, 16, 16) and len(images) <= 7
            assert index.dtype == labels.dtype == torch.int64
            assert labels.tolist() == [rows[i]["label"] for i in index.tolist()]
            indices += index.tolist()
            if checked < 3:  # the image is the eval transform of the sample's own jpg
                i = index[0].item()
                shard = split / rows[i]["shard"]
                import webdataset as wds

                sample = next(
                    s
                    for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)
                    if s["__key__"] == rows[i]["key"]
                )
                image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
                assert torch.allclose(images[0], eval_transform(data)(image), atol=2e-6, rtol=0)
                checked += 1
    assert sorted(indices) == list(range(len(rows)))


def test_bad_arguments_name_the_rule(split, tmp_path):
    data, sampler = cfgs(str(split), steps=5)
    with pytest.raises(ValueError, match=r"rank=2, world_size=2"):
        train_loader(data, sampler, rank=2, world_size=2, epoch=0)
    with pytest.raises(
        ValueError, match=r"start_step=6: must be in 0..sampler.steps_per_epoch \(5\)"
    ):
        train_loader(data, sampler, rank=0, world_size=1, epoch=0, start_step=6)
    with pytest.raises(ValueError, match=r"8 shards for 9 ranks.*smaller --samples-per-shard"):
        train_loader(data, sampler, rank=0, world_size=9, epoch=0)
    data3, sampler3 = cfgs(str(split), workers=3, streams=4)
    with pytest.raises(
        ValueError, match=r"streams_per_rank=4 is not a multiple of data.num_workers=3"
    ):
        train_loader(data3, sampler3, rank=0, world_size=1, epoch=0)
    missing, sampler = cfgs(str(tmp_path / "x-{000000..000001}.tar"))
    with pytest.raises(ValueError, match=r"2 of 2 shards do not exist.*x-000000.tar"):
        train_loader(missing, sampler, rank=0, world_size=1, epoch=0)
    with pytest.raises(ValueError, match=r"holds no \*.tar files"):
        eval_loader(str(tmp_path), data, rank=0, world_size=1, batch_size=4)
    big, sampler = cfgs(str(split), p=30, k=2, buffer=30)
    with pytest.raises(ValueError, match=r"only \d+ distinct classes.*P=30"):
        next(iter(train_loader(big, sampler, rank=0, world_size=1, epoch=0)))


def test_uint8_output_normalises_to_the_same_batches(split):
    from pipeline.data.transforms import normalise_batch

    data, sampler = cfgs(str(split), steps=4, workers=2)
    floats = list(train_loader(data, sampler, rank=0, world_size=1, epoch=0))
    raw = list(train_loader(data, sampler, rank=0, world_size=1, epoch=0, normalise=False))
    assert raw[0][0].dtype == torch.uint8
    assert _equal(floats, [(normalise_batch(x), y) for x, y in raw])
    ev = next(iter(eval_loader(str(split), data, rank=0, world_size=1, batch_size=5)))
    ev8 = next(
        iter(eval_loader(str(split), data, rank=0, world_size=1, batch_size=5, normalise=False))
    )
    assert torch.equal(ev[0], normalise_batch(ev8[0])) and torch.equal(ev[2], ev8[2])


def test_pipe_urls_stream_through_webdataset(split):
    data, sampler = cfgs(f"pipe:cat {split}/synthetic-train-{{000000..000007}}.tar", steps=3)
    assert len(list(train_loader(data, sampler, rank=0, world_size=2, epoch=0))) == 3
    indices = [
        i
        for _, _, index in eval_loader(
            data.train[0].urls, data, rank=0, world_size=1, batch_size=50
        )
        for i in index.tolist()
    ]
    assert sorted(indices) == list(range(120))
