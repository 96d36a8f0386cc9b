"""Face crops through make-shards (the datasets' own geometry files, on tiny copies of their
layouts), the crop-mode rules, and the one image path: the pixels make-shards encodes are the
pixels every query path feeds the model, for every PIL mode the writer handles.

References: the expected pixels of each query path are ``eval_array`` of the pixels captured
where make-shards hands them to the JPEG encoder (before any re-encoding), compared exactly.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.config.schema import DataConfig, DatasetSource
from pipeline.data import faces, image, writer
from pipeline.data.transforms import (
    SCHEME_KEY,
    crop_for_weights,
    eval_transform,
    resolve_crop,
    weights_scheme,
)
from pipeline.serve.export import preprocessing_spec
from pipeline.serve.gallery import load_image_tensor
from pipeline.serve.runtime import to_array
from pipeline.weights import save_weights
from tests.data_helpers.layouts import FACE_TEMPLATE, ijbc, imagefolder, vggface2


def _make(fmt: str, root: Path, out: Path, *extra: str) -> int:
    args = ["make-shards", fmt, "--root", str(root), "--out", str(out), "--workers", "1"]
    return main([*args, "--no-progress", *extra])


def _images(split: Path) -> list[Image.Image]:
    import tarfile

    out = []
    for shard in sorted(split.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    out.append(Image.open(io.BytesIO(tar.extractfile(m).read())))
    return out


def test_face_shards_from_the_datasets_own_files(tmp_path, capsys):
    vggface2(tmp_path / "vgg")
    out = tmp_path / "out"
    extra = ("--crop", "aligned", "--max-skipped-fraction", "1")
    assert _make("vggface2", tmp_path / "vgg", out, *extra) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 of 4 listed images, 1 of them without face landmarks/box" in printed
    assert "no face geometry (aligned crop)" in (out / "train" / "skipped.txt").read_text()
    table = pq.read_table(out / "train" / "index.parquet")
    assert table.schema.field("landmarks_5pt").type == pa.list_(pa.float32())
    assert table.num_rows == 3 and all(len(v) == 10 for v in table["landmarks_5pt"].to_pylist())
    assert faces.split_crop(str(out / "train")) == {
        "mode": "aligned",
        "size": 112,
        "template": "arcface_5pt",
    }
    assert {im.size for im in _images(out / "train")} == {(112, 112)}
    # loose: the box + 30 %, shorter side 256
    assert _make("vggface2", tmp_path / "vgg", tmp_path / "loose", "--crop", "loose") != 0
    assert (
        _make("vggface2", tmp_path / "vgg", tmp_path / "l2", "--crop", "loose", "--split", "test")
        == 0
    )
    assert {min(im.size) for im in _images(tmp_path / "l2" / "test")} == {256}
    loose_rows = pq.read_table(tmp_path / "l2" / "test" / "index.parquet").to_pylist()
    assert all(len(r["landmarks_5pt"]) == 10 for r in loose_rows)  # in the catalog anyway
    # IJB-C aligns by default, its detector scores in the catalog
    ijbc(tmp_path / "ijb")
    assert _make("ijbc", tmp_path / "ijb", tmp_path / "ijbc_out") == 0
    rows = pq.read_table(tmp_path / "ijbc_out" / "test" / "index.parquet").to_pylist()
    assert sorted(round(r["det_score"], 2) for r in rows) == [0.91, 0.92, 0.93, 0.94]
    assert faces.split_crop(str(tmp_path / "ijbc_out" / "test"))["mode"] == "aligned"
    # any ImageFolder with a landmarks CSV; validate-shards shows the crop
    imagefolder(tmp_path / "folder")
    csv = tmp_path / "marks.csv"
    head = "NAME_ID," + ",".join(f"P{i}{a}" for i in range(1, 6) for a in "XY") + ",SCORE"
    marks = ",".join(str(v * 0.2) for v in FACE_TEMPLATE)
    names = ("cat/0", "cat/1", "dog/0", "dog/1")
    csv.write_text("\n".join([head, *(f"{n},{marks},0.5" for n in names)]) + "\n")
    extra = ("--crop", "aligned", "--crop-size", "224", "--landmarks", str(csv))
    assert _make("imagefolder", tmp_path / "folder", tmp_path / "f", *extra) == 0
    assert main(["validate-shards", str(tmp_path / "f" / "train")]) == 0
    assert "face crop: aligned 224x224" in capsys.readouterr().out


def test_crop_arguments_are_one_line_errors(tmp_path, capsys):
    imagefolder(tmp_path / "folder")
    assert _make("imagefolder", tmp_path / "folder", tmp_path / "o", "--crop", "aligned") == 2
    assert re.search(r"--crop aligned needs each image's face geometry", capsys.readouterr().err)
    args = ("--crop", "aligned", "--crop-size", "100")
    assert _make("imagefolder", tmp_path / "folder", tmp_path / "o", *args) == 2
    assert "multiples of 112 or of 128" in capsys.readouterr().err
    assert (
        _make(
            "imagefolder", tmp_path / "folder", tmp_path / "o", "--crop", "loose", "--resize", "64"
        )
        == 2
    )
    assert "--resize 64: does not go with --crop loose" in capsys.readouterr().err


# ---------------------------------------------------------------------------- one image path


def _face(h: int = 150, w: int = 170) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([128 + 90 * np.sin(xx / 7), 128 + 90 * np.cos(yy / 11), xx + yy], -1)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _modes() -> dict[str, bytes]:
    rgb = np.clip(_face(), 0, 255).astype(np.uint8)
    gray16 = (_face()[..., 0] * 250).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    rgba = Image.fromarray(rgb).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(170, dtype=np.uint8), (150, 1))))
    return {
        "I;16 PNG": _save(Image.fromarray(gray16), "PNG"),
        "P": _save(Image.fromarray(rgb).quantize(64), "PNG"),
        "RGBA": _save(rgba, "PNG"),
        "CMYK": _save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
        "EXIF-rotated": _save(Image.fromarray(rgb), "JPEG", quality=95, exif=exif),
    }


LANDMARKS = [v * 0.9 + 20 for v in FACE_TEMPLATE]


def _encoded_pixels(monkeypatch, data: bytes, crop: dict | None) -> np.ndarray:
    """What make-shards hands to the JPEG encoder for ``data``."""
    seen = []
    real = writer.encode_jpeg
    monkeypatch.setattr(writer, "encode_jpeg", lambda im, q: seen.append(im.copy()) or real(im, q))
    writer.prepare_image(data, 0, 90, crop, {"landmarks": LANDMARKS})
    return np.asarray(seen[0])


@pytest.mark.parametrize("crop_mode", ["none", "aligned"])
@pytest.mark.parametrize("mode", list(_modes()))
def test_every_query_path_sees_the_pixels_make_shards_encodes(monkeypatch, mode, crop_mode):
    data = _modes()[mode]
    crop = faces.crop_record(crop_mode)
    stored = _encoded_pixels(monkeypatch, data, crop if crop_mode != "none" else None)
    side = 112 if crop_mode == "aligned" else 96
    cfg = resolve_crop(
        DataConfig(image_size=side, resize_size=side, crop=crop_mode), train=False, eval_urls=""
    )
    spec = preprocessing_spec(cfg, 8)
    expected = image.eval_array(Image.fromarray(stored), spec)
    marks = LANDMARKS if crop_mode == "aligned" else None
    np.testing.assert_array_equal(image.model_input(data, spec, landmarks=marks), expected)
    np.testing.assert_array_equal(to_array(data, spec, marks), expected)  # serving + MLflow
    with _as_file(data) as path:  # pipeline index --images and pipeline search
        np.testing.assert_array_equal(load_image_tensor(path, cfg, marks).numpy(), expected)
    # the evaluation loader's torch transform on the stored pixels: the same input
    torch_input = eval_transform(cfg)(Image.fromarray(stored)).numpy()
    np.testing.assert_allclose(torch_input, expected, atol=2e-6, rtol=0)


class _as_file:
    def __init__(self, data: bytes) -> None:
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "query.img"
        self.path.write_bytes(data)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.dir.cleanup()


def test_a_face_query_is_a_crop_of_the_stored_kind(tmp_path):
    spec = preprocessing_spec(
        resolve_crop(DataConfig(image_size=112, crop="aligned"), train=False, eval_urls=""), 8
    )
    crop = faces.align(Image.fromarray(np.clip(_face(), 0, 255).astype(np.uint8)), LANDMARKS)
    data = _save(crop, "PNG")
    np.testing.assert_array_equal(
        image.model_input(data, spec), image.eval_array(crop, spec)
    )  # an aligned crop as it is
    with pytest.raises(
        faces.CropError,
        match=r"^q.png: a 170x150 image, but the model takes aligned 112x112 face crops; pass",
    ):
        image.model_input(_modes()["P"], spec, what="q.png")


# ---------------------------------------------------------------------------- crop-mode rules


def _split(tmp_path: Path, name: str, crop: str) -> str:
    root = tmp_path / f"{name}_raw"
    vggface2(root)
    out = tmp_path / name
    assert _make("vggface2", root, out, "--crop", crop, "--split", "test") == 0
    return str(out / "test")


def test_crop_mode_mismatch_is_a_one_line_error(tmp_path, capsys):
    aligned, loose = _split(tmp_path, "a", "aligned"), _split(tmp_path, "l", "loose")
    cfg = DataConfig(train=[DatasetSource(urls=aligned)], eval_urls=loose, image_size=112)
    with pytest.raises(
        faces.CropError,
        match=r"^data.train\[0\].urls=.*: a model of aligned 112x112 faces, evaluated on data.eval_urls=.* of loose \(shorter side 256\) faces: .* set data.allow_crop_mismatch=true",
    ):
        resolve_crop(cfg, train=True)
    resolved = resolve_crop(cfg.__class__(**{**cfg.__dict__, "eval_urls": aligned}), train=True)
    assert (resolved.crop, resolved.crop_size, resolved.resize_size) == ("aligned", 112, 112)
    # weights record their scheme; evaluating them on another crop mode is refused in one line
    weights = tmp_path / "w.safetensors"
    scheme = weights_scheme(resolved)
    save_weights(
        {"w": torch.zeros(2)},
        {"backbone": "x", "embedding_dim": 2},
        weights,
        {SCHEME_KEY: json.dumps(scheme)},
    )
    assert scheme == {
        "crop": {"mode": "aligned", "size": 112, "template": "arcface_5pt"},
        "input_size": 112,
        "resize_shorter_side": 112,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    code = main(
        [
            "evaluate",
            "--weights",
            str(weights),
            f"data.eval_urls={loose}",
            "data.image_size=112",
            "tracking.enabled=false",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "evaluated on data.eval_urls=" in err
    allowed = crop_for_weights(
        DataConfig(eval_urls=loose, image_size=112, allow_crop_mismatch=True), weights
    )
    assert allowed.crop == "loose"  # the evaluation split is read as it is stored
    with pytest.raises(
        faces.CropError,
        match=r"data.image_size=224 but data.eval_urls=.* holds aligned 112x112 faces.*set data.image_size=112",
    ):
        crop_for_weights(DataConfig(eval_urls=aligned), weights)


def _encode_as(mode: str, im: Image.Image) -> bytes:
    if mode == "I;16 PNG":
        return _save(Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 257), "PNG")
    if mode == "P":
        return _save(im.quantize(128), "PNG")
    if mode == "RGBA":
        return _save(im.convert("RGBA"), "PNG")
    return _save(im.convert("CMYK"), "JPEG", quality=95)


def test_face_search_finds_each_query_as_its_own_gallery_entry(tmp_path, capsys):
    """16-bit, palette, alpha, CMYK and EXIF-rotated photos with their landmarks: made into
    aligned shards, indexed, then searched with the original files and their landmarks."""
    from pipeline.config.schema_train import ModelConfig
    from pipeline.model import build_model

    root, names = tmp_path / "photos", []
    rng = np.random.default_rng(0)
    for i, (mode, data) in enumerate(_modes().items()):
        # each photo its own pattern: the same modes, shifted colours and a little noise
        pixels = np.asarray(image.decode(data), np.float64)
        pixels = np.clip(
            np.roll(pixels, 9 * i, axis=2 - i % 2) + rng.normal(0, 6, pixels.shape), 0, 255
        )
        im = Image.fromarray(pixels.astype(np.uint8))
        blob = data if mode == "EXIF-rotated" else _encode_as(mode, im)
        name = f"person{i % 2}/photo{i}"
        suffix = ".jpg" if mode in ("CMYK", "EXIF-rotated") else ".png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{name}{suffix}").write_bytes(blob)
        names.append(f"{name}{suffix}")
    csv = tmp_path / "marks.csv"
    head = "NAME_ID," + ",".join(f"P{i}{a}" for i in range(1, 6) for a in "XY")
    rows = [f"{n[:-4]}," + ",".join(map(str, LANDMARKS)) for n in names]
    csv.write_text("\n".join([head, *rows]) + "\n")
    extra = ("--crop", "aligned", "--landmarks", str(csv))
    assert _make("imagefolder", root, tmp_path / "shards", *extra) == 0
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="test_byobnet", embedding_dim=16))
    cfg = resolve_crop(DataConfig(image_size=112, crop="aligned"), train=False, eval_urls="")
    scheme = {SCHEME_KEY: json.dumps(weights_scheme(cfg))}
    weights = save_weights(
        model.state_dict(), model.architecture, tmp_path / "w.safetensors", scheme
    )
    split = tmp_path / "shards" / "train"
    argv = ["build-gallery", "--weights", str(weights), "data.image_size=112", "data.num_workers=0"]
    assert main([*argv, "--shards", str(split), "--out", str(tmp_path / "g")]) == 0
    queries = [str(root / n) for n in names]
    # the query CSV names each file by its path without extension
    qcsv = tmp_path / "q.csv"
    qcsv.write_text(
        "\n".join([head, *(f"{q[:-4]}," + ",".join(map(str, LANDMARKS)) for q in queries)]) + "\n"
    )
    res_file = tmp_path / "res.json"
    search = ["search", str(tmp_path / "g"), *queries, "--k", "2", "--json", str(res_file)]
    assert main([*search, "--landmarks", str(qcsv)]) == 0
    sources = pq.read_table(split / "index.parquet").to_pydict()
    for q, res in zip(names, json.loads(res_file.read_text())):
        top = res["neighbours"][0]
        assert sources["source"][top["row"]] == q
        assert top["score"] > 0.99, (q, top)  # the stored crop differs by its JPEG encoding only
    # pipeline index --images with the same landmarks: the very pixels, the same embeddings
    folder = [
        "build-gallery",
        "--weights",
        str(weights),
        "data.image_size=112",
        "--images",
        str(root),
    ]
    assert main([*folder, "--landmarks", str(csv), "--out", str(tmp_path / "f")]) == 0
    search_f = ["search", str(tmp_path / "f"), *queries, "--k", "1", "--json", str(res_file)]
    search_f.append("--force")  # the same result file, on purpose
    assert main([*search_f, "--landmarks", str(qcsv)]) == 0
    for res in json.loads(res_file.read_text()):
        assert res["neighbours"][0]["source"] == res["query"]
        assert res["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    capsys.readouterr()
    assert main([*search, "--force"]) == 2  # no landmarks, not 112 x 112 crops: one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "but the model takes aligned 112x112 face crops" in err
