"""The training stream made by threads of the training process (data.loader=threads): the same
batches as the DataLoader worker processes, clean stops, errors raised in order; and the
per-sample augmentation against PIL's own crop, resize and flip."""

from __future__ import annotations

import dataclasses
import io
import threading

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.config.schema import DataConfig
from pipeline.data.stream import ThreadedTrainLoader, train_loader
from pipeline.data.transforms import TrainAugment
from tests.data_helpers import cfgs


@pytest.fixture(scope="module")
def split(synthetic_split):
    return synthetic_split(classes=24, per_class=5, samples_per_shard=15)


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b)
    )


def _with(data: DataConfig, **kw) -> DataConfig:
    return dataclasses.replace(data, **kw)


@pytest.mark.parametrize("normalise", [True, False])
def test_threads_give_the_batches_of_the_worker_processes(split, normalise):
    data, sampler = cfgs(str(split), steps=10, streams=2, workers=2)
    kw = dict(rank=1, world_size=2, epoch=2, normalise=normalise)
    threaded = train_loader(data, sampler, **kw)
    assert isinstance(threaded, ThreadedTrainLoader) and len(threaded) == 10
    first = list(threaded)
    processes = list(train_loader(_with(data, loader="processes"), sampler, **kw))
    in_process = list(train_loader(_with(data, num_workers=0), sampler, **kw))
    assert _equal(first, processes) and _equal(first, in_process)
    one_thread = _with(data, num_workers=1)
    assert _equal(first, list(train_loader(one_thread, sampler, **kw)))
    tail = list(train_loader(data, sampler, **kw, start_step=7))
    assert _equal(first[7:], tail)


def test_a_consumer_that_stops_early_leaves_no_thread_behind(split):
    data, sampler = cfgs(str(split), steps=40, workers=2)
    before = threading.active_count()
    batches = iter(train_loader(data, sampler, rank=0, world_size=1, epoch=0))
    next(batches), next(batches)
    batches.close()  # what dropping the iterator does
    assert threading.active_count() == before


def _shard(path, groups: list[tuple[int, list[bytes]]]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for label, blobs in groups:
            for i, blob in enumerate(blobs):
                sink.write({"__key__": f"c{label}_{i}", "jpg": blob, "cls": str(label)})


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def test_undecodable_images_are_replaced_or_raised_in_batch_order(tmp_path, caplog):
    good = [(c, [_jpeg(10 * c + i) for i in range(3)]) for c in range(4)]
    _shard(tmp_path / "a-000000.tar", [(0, [b"not a jpeg", *good[0][1][1:]]), *good[1:]])
    _shard(tmp_path / "a-000001.tar", good)
    data, sampler = cfgs(str(tmp_path / "a-{000000..000001}.tar"), p=4, k=3, steps=4, workers=2)
    batches = list(train_loader(data, sampler, rank=0, world_size=1, epoch=0))
    assert len(batches) == 4 and "c0_0 does not decode" in caplog.text
    reference = list(
        train_loader(_with(data, loader="processes"), sampler, rank=0, world_size=1, epoch=0)
    )
    assert _equal(batches, reference)

    _shard(tmp_path / "b-000000.tar", [(0, [b"broken"] * 3), *good[1:]])
    _shard(tmp_path / "b-000001.tar", [(0, [b"broken"] * 3), *good[1:]])
    data, sampler = cfgs(str(tmp_path / "b-{000000..000001}.tar"), p=4, k=3, steps=4, workers=2)
    with pytest.raises(ValueError, match=r"no image of a class group decodes.*validate-shards"):
        list(train_loader(data, sampler, rank=0, world_size=1, epoch=0))


def test_augment_draws_a_valid_crop_box():
    augment = TrainAugment(DataConfig(image_size=16, crop_scale_min=0.2))
    rng = np.random.default_rng(0)
    seen_fallback = 0
    for width, height in [(40, 30), (30, 40), (100, 10), (10, 100), (17, 17)]:
        for _ in range(300):
            top, left, h, w = augment.crop_box(width, height, rng)
            assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
            assert h > 0 and w > 0
            # a drawn box: area fraction in [0.2, 1] and aspect ratio in [3/4, 4/3] up to the
            # rounding of its sides; otherwise (10 tries failed) the centred box of the whole
            # short side at the ratio clamped to [3/4, 4/3]
            drawn = (0.2 * 0.7 <= w * h / (width * height) <= 1.0) and (
                3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
            )
            if width / height < 3 / 4:  # too tall: the whole width, at ratio 3/4
                fw, fh = width, round(width * 4 / 3)
            elif width / height > 4 / 3:  # too wide: the whole height, at ratio 4/3
                fw, fh = round(height * 4 / 3), height
            else:
                fw, fh = width, height
            fallback = (h, w) == (fh, fw) and (top, left) == ((height - fh) // 2, (width - fw) // 2)
            assert drawn or fallback, (width, height, top, left, h, w)
            seen_fallback += fallback and not drawn
    assert seen_fallback > 0  # the 100 x 10 images rarely fit a drawn box


def test_augment_equals_pil_crop_resize_and_flip():
    augment = TrainAugment(DataConfig(image_size=16, crop_scale_min=0.3))
    image = Image.open(io.BytesIO(_jpeg(1))).convert("RGB")
    flips = 0
    for position in range(40):
        out = augment(image, np.random.default_rng([7, position]))
        replay = np.random.default_rng([7, position])
        top, left, h, w = augment.crop_box(image.width, image.height, replay)
        flipped = replay.random() < 0.5
        ref = image.crop((left, top, left + w, top + h)).resize((16, 16), Image.Resampling.BILINEAR)
        if flipped:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        flips += flipped
        assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
        assert torch.equal(out, torch.from_numpy(np.array(ref)).permute(2, 0, 1))
    assert 5 < flips < 35
    aligned = TrainAugment(DataConfig(image_size=24, crop="aligned", crop_size=24))
    square = image.resize((24, 24))
    out = aligned(square, np.random.default_rng(3))
    mirrored = torch.flip(torch.from_numpy(np.array(square)).permute(2, 0, 1), dims=[2])
    assert torch.equal(out, mirrored) or torch.equal(out, mirrored.flip(2))


def test_batch_memory_is_reused_only_when_nobody_holds_the_batch(split):
    data, sampler = cfgs(str(split), steps=16, workers=2)
    kw = dict(rank=0, world_size=1, epoch=0)
    want = list(train_loader(_with(data, loader="processes"), sampler, **kw))
    kept_view, clones, pointers = None, [], set()
    for b, (images, labels) in enumerate(train_loader(data, sampler, **kw)):
        clones.append((images.clone(), labels))
        pointers.add(images.data_ptr())
        if b == 3:
            kept_view = images[2:5]  # a view the caller keeps: its batch is never reused
    assert _equal(clones, want)
    assert torch.equal(kept_view, want[3][0][2:5])
    assert len(pointers) < 16  # dropped batches' memory came back
