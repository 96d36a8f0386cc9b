"""Shard specs, the index readers, the synthetic generator and the transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config.schema import DataConfig
from pipeline.data.catalog import expand_urls, read_index, read_sizes, split_dir
from pipeline.data.synthetic import render, render_jpeg, synthetic_items
from pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_image,
    eval_geometry,
    eval_transform,
    normalise_batch,
    train_geometry,
    train_transform,
)
from tests.data_helpers import jpeg_bytes


@pytest.fixture(scope="module")
def split(synthetic_split):
    return synthetic_split(classes=4, per_class=3, samples_per_shard=6)


def test_shard_specs_expand_the_same_way(split, tmp_path):
    names = list(read_sizes(split))
    assert names == ["synthetic-train-000000.tar", "synthetic-train-000001.tar"]
    by_dir = expand_urls(str(split))
    assert by_dir == [str(split / n) for n in names]
    assert expand_urls(str(split / "synthetic-train-{000000..000001}.tar")) == by_dir
    assert expand_urls(f"{by_dir[1]}::{by_dir[0]}") == by_dir[::-1]
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# my shards\n{by_dir[0]}\n\n{by_dir[1]}\n")
    assert expand_urls(str(listing)) == by_dir
    remote = "pipe:aws s3 cp s3://b/x-{000000..000002}.tar -"
    assert expand_urls(remote) == [f"pipe:aws s3 cp s3://b/x-00000{i}.tar -" for i in range(3)]
    with pytest.raises(ValueError, match=r"cannot locate index\.parquet for remote shards"):
        split_dir(remote)
    with pytest.raises(ValueError, match=r"shard list file .*nope.txt' does not exist"):
        expand_urls(str(tmp_path / "nope.txt"))


def test_read_index_from_dir_file_or_spec(split, tmp_path):
    by_dir = read_index(str(split))
    assert by_dir.num_rows == 12
    assert by_dir.equals(read_index(str(split / "index.parquet")))
    assert by_dir.equals(read_index(str(split / "synthetic-train-{000000..000001}.tar")))
    assert by_dir.column("index").to_pylist() == list(range(12))
    with pytest.raises(FileNotFoundError, match=r"index.parquet does not exist"):
        read_index(str(tmp_path))
    (tmp_path / "sizes.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must map shard file names to integer counts"):
        read_sizes(tmp_path)


def test_synthetic_is_deterministic_varied_and_train_test_disjoint():
    assert render_jpeg(3, 5, 1, 32, 90) == render_jpeg(3, 5, 1, 32, 90)
    same_class = [np.asarray(render(0, 5, i, 32), np.float32) for i in range(2)]
    assert np.abs(same_class[0] - same_class[1]).mean() > 10  # nuisances change the image
    train = synthetic_items(
        split="train", num_classes=3, images_per_class=2, image_size=32, seed=0, quality=90
    )
    test = synthetic_items(
        split="test", num_classes=3, images_per_class=2, image_size=32, seed=0, quality=90
    )
    assert not {i.class_name for i in train} & {i.class_name for i in test}
    with pytest.raises(ValueError, match="synthetic split 'val': use 'train' or 'test'"):
        synthetic_items(
            split="val", num_classes=1, images_per_class=1, image_size=32, seed=0, quality=90
        )
    with pytest.raises(ValueError, match="image_size=8: must be >= 16"):
        synthetic_items(
            split="train", num_classes=1, images_per_class=1, image_size=8, seed=0, quality=90
        )


def test_transforms_shapes_normalisation_and_draft_decoding():
    cfg = DataConfig(image_size=20, resize_size=24, crop_scale_min=0.5)
    image = decode_image(jpeg_bytes(40, 30))
    out = eval_transform(cfg)(image)
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    # reference: resize shorter side to 24, centre crop 20, then (x / 255 - mean) / std
    ref = image.resize((32, 24), resample=2)  # PIL bilinear, as torchvision's antialiased resize
    left, top = (32 - 20) // 2, (24 - 20) // 2
    ref = np.asarray(ref.crop((left, top, left + 20, top + 20)), np.float64) / 255
    ref = (ref - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(out.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    torch.manual_seed(0)
    a = train_transform(cfg)(image)
    torch.manual_seed(0)
    assert a.shape == (3, 20, 20) and torch.equal(a, train_transform(cfg)(image))
    # draft decoding: a large JPEG is decoded at a reduced scale, never below min_side
    big = jpeg_bytes(400, 300)
    assert decode_image(big).size == (400, 300)
    assert decode_image(big, min_side=100).size == (200, 150)
    assert decode_image(big, min_side=200).size == (400, 300)


def test_batched_normalisation_equals_the_per_image_transforms():
    cfg = DataConfig(image_size=20, resize_size=24, crop_scale_min=0.3)
    images = [decode_image(jpeg_bytes(40, 30, seed=i)) for i in range(5)]
    torch.manual_seed(7)
    per_image = torch.stack([train_transform(cfg)(im) for im in images])
    torch.manual_seed(7)  # the geometry draws the same random numbers
    batched = normalise_batch([train_geometry(cfg)(im) for im in images])
    assert batched.dtype == torch.float32
    assert torch.allclose(batched, per_image, atol=2e-6, rtol=0)
    evaluated = normalise_batch([eval_geometry(cfg)(im) for im in images])
    assert torch.allclose(
        evaluated, torch.stack([eval_transform(cfg)(im) for im in images]), atol=2e-6, rtol=0
    )
