"""Every image mode PIL opens becomes the RGB picture it shows (a 16-bit PNG once became a
near-white JPEG). Each case is checked against a reference computed here with numpy from the
pixels the test wrote, independently of pipeline.data.imagemode.

Tolerance: the output is a JPEG (quality 95). The test images are smooth gradients or flat
16x16 blocks aligned with JPEG's macroblocks (compared 2 pixels away from a colour edge, where
the decoder's chroma upsampling blends neighbouring blocks), so the only difference from the
reference is JPEG rounding: mean absolute error <= 1.5 and max <= 12 grey levels per channel. A wrong rule
(clipping, alpha dropped, orientation ignored) is off by tens to hundreds.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.items import SourceItem
from pipeline.data.writer import prepare_image, write_split

H, W = 32, 48
QUALITY = 95


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _ramp(low: float, high: float, transpose: bool = False) -> np.ndarray:
    """A smooth H x W ramp from low to high along x (or y)."""
    t = np.linspace(0.0, 1.0, H if transpose else W)
    ramp = low + (high - low) * t
    return np.broadcast_to(ramp[:, None] if transpose else ramp[None, :], (H, W)).copy()


def _blocks(values: list[int]) -> np.ndarray:
    """H x W array of 16x16 blocks cycling through ``values`` (aligned with JPEG's 16x16 MCU,
    so that subsampled chroma never straddles two colours)."""
    by, bx = np.meshgrid(np.arange(H) // 16, np.arange(W) // 16, indexing="ij")
    return np.asarray(values)[(by * 5 + bx) % len(values)]


def _gray(v: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(v, np.float64)[..., None], 3, axis=2)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = np.asarray(alpha, np.float64)[..., None] / 255.0
    return np.asarray(rgb, np.float64) * a + 255.0 * (1.0 - a)


def _decoded(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.mode == "RGB"
    return np.asarray(image, np.float64)


def _away_from_block_edges() -> np.ndarray:
    """H x W mask: pixels at least 2 away from a 16-pixel block edge."""
    y, x = np.meshgrid(np.arange(H) % 16, np.arange(W) % 16, indexing="ij")
    return (y >= 2) & (y < 14) & (x >= 2) & (x < 14)


def _assert_close(got: np.ndarray, want: np.ndarray, blocky: bool = False) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want)
    if blocky:
        err = err[_away_from_block_edges()]
    assert err.mean() <= 1.5 and err.max() <= 12, (err.mean(), err.max())


# ----------------------------------------------------------------------------- cases


def case_1():
    bits = _blocks([0, 1, 1, 0, 1])
    return _save(Image.fromarray(bits.astype(bool)), "PNG"), _gray(bits * 255)


def case_L():
    v = np.rint(_ramp(10, 240)).astype(np.uint8)
    return _save(Image.fromarray(v, "L"), "PNG"), _gray(v)


def case_RGB():
    rgb = np.stack([_ramp(0, 255), _ramp(255, 0, True), _ramp(60, 180)], -1)
    rgb = np.rint(rgb).astype(np.uint8)
    return _save(Image.fromarray(rgb, "RGB"), "PNG"), rgb


def case_YCbCr():
    ycc = np.stack([_ramp(40, 220), _ramp(90, 170, True), _ramp(170, 100)], -1)
    ycc = np.rint(ycc).astype(np.uint8)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    # JFIF (ITU-T T.871) full-range BT.601
    ref = np.stack(
        [
            y + 1.402 * (cr - 128),
            y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
            y + 1.772 * (cb - 128),
        ],
        -1,
    )
    return _save(Image.fromarray(ycc, "YCbCr"), "TIFF"), np.clip(ref, 0, 255)


def case_CMYK():
    cmyk = np.stack([_ramp(0, 200), _ramp(200, 0, True), _ramp(30, 90), _ramp(0, 60, True)], -1)
    cmyk = np.rint(cmyk).astype(np.uint8)
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    ref = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1)
    return _save(Image.fromarray(cmyk, "CMYK"), "TIFF"), ref / 255


def case_CMYK_jpeg():
    cmyk = np.stack([_ramp(0, 200), _ramp(200, 0, True), _ramp(30, 90), _ramp(0, 60, True)], -1)
    data = _save(Image.fromarray(np.rint(cmyk).astype(np.uint8), "CMYK"), "JPEG", quality=98)
    stored = Image.open(io.BytesIO(data))
    assert stored.mode == "CMYK"  # kept byte for byte, a reader would get CMYK pixels
    c, m, y, k = (np.asarray(stored, np.float64)[..., i] for i in range(4))
    ref = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1)
    return data, ref / 255


PALETTE = np.array([[200, 30, 40], [20, 180, 60], [30, 40, 220], [250, 250, 10]])


def _paletted(idx: np.ndarray) -> Image.Image:
    image = Image.fromarray(idx.astype(np.uint8), "P")
    image.putpalette(PALETTE.astype(np.uint8).ravel().tolist())
    return image


def case_P():
    idx = _blocks([0, 1, 2, 3])
    return _save(_paletted(idx), "PNG"), PALETTE[idx]


def case_P_transparency():
    idx = _blocks([0, 1, 2, 3])
    alpha = np.where(idx == 2, 0, 255)  # palette entry 2 is fully transparent
    return _save(_paletted(idx), "PNG", transparency=2), _over_white(PALETTE[idx], alpha)


def case_PA():
    idx = _blocks([0, 1, 2, 3])
    alpha = np.rint(_ramp(0, 255)).astype(np.uint8)
    image = _paletted(idx)
    image.putalpha(Image.fromarray(alpha, "L"))
    assert image.mode == "PA"
    return _save(image, "TIFF"), _over_white(PALETTE[idx], alpha)


def case_LA():
    v = np.rint(_ramp(0, 200, True)).astype(np.uint8)
    alpha = np.rint(_ramp(255, 0)).astype(np.uint8)
    image = Image.fromarray(np.stack([v, alpha], -1), "LA")
    return _save(image, "PNG"), _over_white(_gray(v), alpha)


def case_RGBA():
    rgb = np.rint(np.stack([_ramp(0, 255), _ramp(40, 90), _ramp(255, 0, True)], -1))
    alpha = np.rint(_ramp(30, 255, True))
    rgba = np.concatenate([rgb, alpha[..., None]], -1).astype(np.uint8)
    return _save(Image.fromarray(rgba, "RGBA"), "PNG"), _over_white(rgb, alpha)


def _uint16() -> np.ndarray:
    return np.rint(_ramp(0, 65535)).astype(np.uint16)


def case_I16_png():
    v = _uint16()
    data = _save(Image.fromarray(v), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    return data, _gray(v / 65535 * 255)


def case_I16B_tiff():
    v = _uint16()
    image = Image.frombytes("I;16B", (W, H), v.astype(">u2").tobytes())
    data = _save(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    return data, _gray(v / 65535 * 255)


def case_I_16bit_pgm():
    v = _uint16()
    data = f"P5 {W} {H} 65535\n".encode() + v.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(data)).mode == "I"  # PIL reads 16-bit PGM as 32-bit "I"
    return data, _gray(v / 65535 * 255)


def case_I_full_range():
    v = np.rint(_ramp(-(2**31), 2**31 - 1)).astype(np.int64).clip(-(2**31), 2**31 - 1)
    data = _save(Image.fromarray(v.astype(np.int32), "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    return data, _gray((v + 2**31) / (2**32 - 1) * 255)


def case_F_unit():
    v = _ramp(0.0, 1.0, True).astype(np.float32)
    return _save(Image.fromarray(v, "F"), "TIFF"), _gray(v.astype(np.float64) * 255)


def case_F_minmax():
    v = _ramp(-3.0, 500.0).astype(np.float32)
    lo, hi = float(v.min()), float(v.max())
    return _save(Image.fromarray(v, "F"), "TIFF"), _gray((v - lo) / (hi - lo) * 255)


BLOCKY = {"1", "P", "P_transparency", "PA"}
CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_mode_becomes_the_rgb_it_shows(mode):
    data, want = CASES[mode]()
    out, width, height = prepare_image(data, resize=0, quality=QUALITY)
    assert (width, height) == (W, H)
    _assert_close(_decoded(out), np.asarray(want, np.float64), blocky=mode in BLOCKY)


# EXIF orientation -> the numpy operation that turns the stored pixels into the displayed ones.
ORIENTATIONS = {
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),  # stored turned 90 degrees counter-clockwise
    8: lambda a: np.rot90(a, 1),
}


def _oriented_jpeg(orientation: int) -> tuple[bytes, np.ndarray]:
    rgb = np.rint(np.stack([_ramp(0, 255), _ramp(0, 255, True), _ramp(80, 120)], -1))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(rgb.astype(np.uint8)), "JPEG", quality=98, exif=exif)
    stored = np.asarray(Image.open(io.BytesIO(data)), np.float64)  # plain decode: no turn
    return data, ORIENTATIONS[orientation](stored)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation):
    data, want = _oriented_jpeg(orientation)
    out, width, height = prepare_image(data, resize=0, quality=QUALITY)
    assert (height, width) == want.shape[:2]
    _assert_close(_decoded(out), want)


def test_exif_orientation_with_resize_gives_the_displayed_size():
    data, _ = _oriented_jpeg(6)  # stored 48 x 32, shown 32 x 48
    out, width, height = prepare_image(data, resize=12, quality=QUALITY)
    assert (width, height) == (12, 18)
    assert Image.open(io.BytesIO(out)).size == (12, 18)


def test_sixteen_bit_with_resize_is_scaled_not_clipped():
    data, want = case_I16_png()
    out, width, height = prepare_image(data, resize=H, quality=QUALITY)
    assert (width, height) == (W, H)
    _assert_close(_decoded(out), want)


def test_unconvertible_images_are_skipped_counted_and_reported(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    good, _ = case_L()
    nan = _ramp(0.0, 1.0).astype(np.float32)
    nan[3, 4] = np.nan
    lab = np.rint(np.stack([_ramp(0, 255), _ramp(100, 150), _ramp(120, 130)], -1))
    files = {
        "good.png": good,
        "nan.tif": _save(Image.fromarray(nan, "F"), "TIFF"),
        "lab.tif": _save(Image.fromarray(lab.astype(np.uint8), "LAB"), "TIFF"),
    }
    items = []
    for fname, data in files.items():
        (src / fname).write_bytes(data)
        items.append(SourceItem("c", fname, str(src / fname)))
    summary = write_split(
        items, tmp_path / "o", name="t", split="s", max_skipped_fraction=1.0, progress=False
    )
    assert (summary.samples, summary.skipped, summary.listed) == (1, 2, 3)
    report = dict(
        line.split("\t") for line in (tmp_path / "o/s/skipped.txt").read_text().splitlines()
    )
    assert report.keys() == {str(src / "nan.tif"), str(src / "lab.tif")}
    assert "mode F" in report[str(src / "nan.tif")] and "NaN" in report[str(src / "nan.tif")]
    assert "image mode 'LAB' has no stated conversion" in report[str(src / "lab.tif")]
