"""Face crops against references written here from the protocol, independently of
pipeline.data.faces (which fits with Umeyama's SVD and warps with Pillow): the similarity
transform by linear least squares on (a, b, tx, ty) with x' = a x - b y + tx,
y' = b x + a y + ty, and a bilinear sampler in numpy with OpenCV's convention (pixel centres at
integers, 0 outside the image), as insightface's ``norm_crop`` (cv2.warpAffine, black border).

The synthetic face: a smooth colour pattern of 240 x 200 pixels whose five landmarks are the
ArcFace template moved by a known similarity; the crop is compared before any JPEG encoding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from pipeline.data import faces

TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]]
)  # fmt: skip


def _ls_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1.0, 0.0], [y, x, 0.0, 1.0]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.asarray(rows), np.asarray(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def _bilinear_warp(pixels: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """out[y, x] = pixels sampled at inverse(matrix) (x, y), 0 outside, float64."""
    h, w = pixels.shape[:2]
    inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    out = np.zeros((size, size, pixels.shape[2]))
    for yo in range(size):
        for xo in range(size):
            xs, ys, _ = inv @ (xo, yo, 1.0)
            x0, y0 = math.floor(xs), math.floor(ys)
            fx, fy = xs - x0, ys - y0
            acc = np.zeros(pixels.shape[2])
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    yy, xx = y0 + dy, x0 + dx
                    if 0 <= yy < h and 0 <= xx < w:
                        acc += wy * wx * pixels[yy, xx]
            out[yo, xo] = acc
    return out


def _face_image(h: int = 200, w: int = 240) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    g = 128 + 90 * np.cos((xx + yy) / 17.0)
    b = 40 + 200 * (xx / w) * (yy / h)
    return np.clip(np.stack([r, g, b], -1), 0, 255).round().astype(np.uint8)


def _moved_template(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return TEMPLATE_112 @ rot.T * scale + np.asarray(shift)


@pytest.mark.parametrize(
    ("angle", "scale", "shift", "size"),
    [
        (17.0, 1.6, (40.0, 20.0), 112),  # inside the image
        (-25.0, 0.8, (-30.0, 150.0), 112),  # partly outside: black border
        (8.0, 1.3, (60.0, 10.0), 224),  # 2 x 112: template scaled by 2
        (5.0, 1.1, (50.0, 30.0), 128),  # 128: scaled by 128/128, x shifted by 8
    ],
)
def test_alignment_equals_the_least_squares_bilinear_reference(angle, scale, shift, size):
    pixels = _face_image()
    landmarks = _moved_template(angle, scale, shift)
    # A little noise on the landmarks: the fit is a least-squares one, not an exact one.
    landmarks += np.random.default_rng(0).normal(0, 0.7, landmarks.shape)
    if size % 112 == 0:
        dst = TEMPLATE_112 * size / 112
    else:
        dst = TEMPLATE_112 * size / 128 + [8 * size / 128, 0]
    reference = _bilinear_warp(pixels, _ls_similarity(landmarks, dst), size)
    got = faces.align(Image.fromarray(pixels), landmarks.reshape(-1), size)
    assert got.size == (size, size) and got.mode == "RGB"
    diff = np.abs(np.asarray(got, np.float64) - reference)
    assert diff.mean() <= 1.0, diff.mean()
    if shift[0] < 0:  # partly outside: a real black region, matched
        assert (reference.sum(-1) == 0).mean() > 0.05
        assert (np.asarray(got).sum(-1) == 0).mean() > 0.05


def test_similarity_fit_matches_the_reference_fit():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 300, (5, 2))
    dst = rng.uniform(0, 112, (5, 2))
    np.testing.assert_allclose(
        faces.similarity_transform(src, dst), _ls_similarity(src, dst), atol=1e-9
    )


def _loose_reference(box, width, height):
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    left = max(0, int(np.floor(cx - 0.65 * w + 0.5)))
    top = max(0, int(np.floor(cy - 0.65 * h + 0.5)))
    right = min(width, int(np.floor(cx + 0.65 * w + 0.5)))
    bottom = min(height, int(np.floor(cy + 0.65 * h + 0.5)))
    return left, top, right, bottom


@pytest.mark.parametrize(
    "box", [(60.3, 40.2, 80.0, 100.0), (-10.0, 5.0, 90.0, 120.0), (150.0, 100.0, 100.0, 90.0)]
)
def test_loose_crop_geometry(box):
    pixels = _face_image()
    left, top, right, bottom = _loose_reference(box, 240, 200)
    assert faces.loose_box(box, 240, 200) == (left, top, right, bottom)
    got = faces.loose_crop(Image.fromarray(pixels), box, 256)
    cw, ch = right - left, bottom - top
    assert min(got.size) == 256
    assert got.size == (round(cw * 256 / min(cw, ch)), round(ch * 256 / min(cw, ch)))
    # The content is the enlarged box: resizing it back matches the source region.
    back = np.asarray(got.resize((cw, ch), Image.Resampling.BILINEAR), np.float64)
    assert np.abs(back - pixels[top:bottom, left:right]).mean() < 3.0


def test_crop_rules_are_one_line_errors():
    with pytest.raises(faces.CropError, match=r"aligned crop size 100: .*multiples of 112 or"):
        faces.crop_record("aligned", 100)
    with pytest.raises(faces.CropError, match=r"crop mode 'tight': use one of none, loose"):
        faces.crop_record("tight")
    with pytest.raises(faces.MissingFaceGeometry, match="no five-point landmarks"):
        faces.align(Image.new("RGB", (10, 10)), None)
    crop = Image.new("RGB", (100, 90))
    with pytest.raises(faces.CropError, match=r"q.jpg: a 100x90 image, .*aligned 112x112 face"):
        faces.check_query_size(crop, faces.crop_record("aligned"), "q.jpg")
