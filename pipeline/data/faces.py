"""Face crops made when shards are written: five-point alignment, the VGGFace2 loose crop, none.

Three modes, recorded with each split (:func:`crop_record`, in ``index.parquet``'s metadata):

- ``aligned``: a similarity transform (rotation, uniform scale, translation: 4 degrees of
  freedom), fitted by least squares (Umeyama 1991) from the image's five landmarks (left eye,
  right eye, nose tip, left and right mouth corners) onto the ArcFace template, then the image is
  warped into a ``size`` x ``size`` crop, bilinear, black where the warp reads outside the
  image. This is what insightface's ``face_align.norm_crop`` does with the landmarks of its
  IJB-C release and what ArcFace-style models are trained on. The template is given for
  112 x 112; for another size insightface scales it by ``size / 112`` when ``size`` is a
  multiple of 112, and otherwise by ``size / 128`` with x shifted right by ``8 * size / 128``
  (the 128-px variant centres the 112-px face); other sizes are refused as they are there.
- ``loose``: the VGGFace2 authors' crop: the dataset's face box enlarged by 30 % about its centre
  to take in the whole head (kept within the image, never padded), then resized so that its
  shorter side is ``size`` (256: the networks are trained on random 224 crops of it).
- ``none``: the image as it is.

Coordinates are pixel coordinates with pixel centres at integers (OpenCV's convention, which
insightface and the datasets' landmark files use): pixel (0, 0) covers [-0.5, 0.5]^2.
Only NumPy and Pillow are used (the exported model's runtime carries this file).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import UserError

CROP_MODES = ("none", "loose", "aligned")
DEFAULT_SIZES = {"none": 0, "loose": 256, "aligned": 112}
LOOSE_EXTEND = 0.3
"""The box grows by 30 % of its width and height (15 % on each side), as in the VGGFace2
authors' released models."""
TEMPLATE = "arcface_5pt"
WHOLE_IMAGE = "whole image"
"""The box of an image that is a loose crop already (IJB-C's ``loose_crop/``): resized only."""

ARCFACE_112 = np.array(
    [
        [38.2946, 51.6963],  # left eye (as seen in the image)
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)
"""The ArcFace 5-point template of a 112 x 112 crop (insightface's ``arcface_dst``)."""


class CropError(UserError, ValueError):
    """A face crop cannot be made or does not match; the message names the value and the fix."""


class MissingFaceGeometry(ValueError):
    """An image has no landmarks (aligned) or no box (loose): the writer counts and lists it."""


def check_crop(mode: str, size: int) -> tuple[str, int]:
    """(mode, size) with the default size filled in; CropError for a value out of its rules."""
    if mode not in CROP_MODES:
        raise CropError(f"crop mode {mode!r}: use one of {', '.join(CROP_MODES)}")
    size = int(size) or DEFAULT_SIZES[mode]
    if mode == "aligned" and (size <= 0 or (size % 112 and size % 128)):
        raise CropError(
            f"aligned crop size {size}: the ArcFace template is defined for multiples of 112 "
            "or of 128 pixels (e.g. 112, 128, 224); pick one of those"
        )
    if mode == "loose" and size <= 0:
        raise CropError(f"loose crop size {size}: the shorter side must be > 0 (e.g. 256)")
    return mode, size


def crop_record(mode: str, size: int = 0) -> dict[str, Any]:
    """The JSON-able description of a crop, recorded with a split and in the weights."""
    mode, size = check_crop(mode, size)
    record: dict[str, Any] = {"mode": mode, "size": size}
    if mode == "aligned":
        record["template"] = TEMPLATE
    elif mode == "loose":
        record["extend"] = LOOSE_EXTEND
    return record


def describe(record: dict[str, Any]) -> str:
    """One phrase for messages: ``aligned 112x112``, ``loose (shorter side 256)``, ``none``."""
    mode, size = record.get("mode", "none"), record.get("size", 0)
    if mode == "aligned":
        return f"aligned {size}x{size}"
    if mode == "loose":
        return f"loose (shorter side {size})"
    return str(mode)


def template(size: int) -> np.ndarray:
    """The 5 x 2 template of an aligned ``size`` x ``size`` crop (insightface's scaling)."""
    _, size = check_crop("aligned", size)
    if size % 112 == 0:
        return ARCFACE_112 * (size / 112.0)
    ratio = size / 128.0
    return ARCFACE_112 * ratio + np.array([8.0 * ratio, 0.0])


def similarity_transform(src_52: np.ndarray, dst_52: np.ndarray) -> np.ndarray:
    """The 2 x 3 matrix M of the similarity (s R | t) minimising sum |M [src;1] - dst|^2.

    Umeyama's closed form: the rotation from the SVD of the centred cross-covariance (with the
    reflection excluded), the scale from the singular values over the source variance.
    """
    src = np.asarray(src_52, np.float64).reshape(-1, 2)
    dst = np.asarray(dst_52, np.float64).reshape(-1, 2)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c**2).sum() / len(src)
    if var_s <= 0:
        raise MissingFaceGeometry("the five landmarks coincide: no transform fits them")
    cov = d_c.T @ s_c / len(src)
    u, sing, vt = np.linalg.svd(cov)
    flip = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        flip[1, 1] = -1.0
    rot = u @ flip @ vt
    scale = float((sing * np.diag(flip)).sum() / var_s)
    trans = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, trans[:, None]])


def parse_landmarks(values: Any) -> np.ndarray:
    """Ten numbers (x1, y1, ..., x5, y5) as a 5 x 2 float64 array; MissingFaceGeometry if
    absent or not finite."""
    if values is None:
        raise MissingFaceGeometry("no five-point landmarks")
    points = np.asarray(values, np.float64).reshape(-1)
    if points.size != 10 or not np.isfinite(points).all():
        raise MissingFaceGeometry(f"landmarks {list(points)}: expected 10 finite numbers")
    return points.reshape(5, 2)


def align(image: Image.Image, landmarks: Any, size: int = 112) -> Image.Image:
    """The aligned ``size`` x ``size`` RGB crop of ``image`` (see the module docstring).

    Pillow's affine warp samples at pixel centres offset by 0.5 and repeats the edge pixel just
    outside the image; a one-pixel black frame around the source turns that into OpenCV's
    constant black border, so a landmark set partly outside the image blends into black there.
    """
    matrix = similarity_transform(parse_landmarks(landmarks), template(size))
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))
    pad = 1
    framed = Image.new("RGB", (image.width + 2 * pad, image.height + 2 * pad))
    framed.paste(image.convert("RGB"), (pad, pad))
    # Pillow's coordinates are ours + 0.5, in both images; the source is also shifted by pad.
    to_ours = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    to_pillow = np.array([[1.0, 0.0, 0.5 + pad], [0.0, 1.0, 0.5 + pad], [0.0, 0.0, 1.0]])
    coeffs = (to_pillow @ inverse @ to_ours)[:2].reshape(-1)
    return framed.transform(
        (size, size),
        Image.Transform.AFFINE,
        tuple(float(c) for c in coeffs),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )


def loose_box(box_xywh: Any, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), integer pixel edges, of the box enlarged by
    :data:`LOOSE_EXTEND` about its centre and kept within the ``width`` x ``height`` image."""
    if box_xywh is None:
        raise MissingFaceGeometry("no face box")
    x, y, w, h = (float(v) for v in np.asarray(box_xywh, np.float64).reshape(-1))
    if not (w > 0 and h > 0 and all(map(math.isfinite, (x, y, w, h)))):
        raise MissingFaceGeometry(f"face box {[x, y, w, h]}: width and height must be > 0")
    cx, cy = x + w / 2.0, y + h / 2.0
    half_w, half_h = w * (1 + LOOSE_EXTEND) / 2.0, h * (1 + LOOSE_EXTEND) / 2.0
    edge = lambda v: math.floor(v + 0.5)  # noqa: E731  (nearest pixel edge, halves up)
    left, top = max(0, edge(cx - half_w)), max(0, edge(cy - half_h))
    right, bottom = min(width, edge(cx + half_w)), min(height, edge(cy + half_h))
    if right - left < 1 or bottom - top < 1:
        raise MissingFaceGeometry(
            f"face box {[x, y, w, h]} lies outside the {width}x{height} image"
        )
    return left, top, right, bottom


def short_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(w, h) with the shorter side ``short`` and the aspect ratio kept (rounded)."""
    scale = short / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def loose_crop(image: Image.Image, box_xywh: Any, size: int = 256) -> Image.Image:
    """The VGGFace2 loose crop: enlarged box, then the shorter side resized to ``size``
    (bicubic, as make-shards' ``--resize``)."""
    if isinstance(box_xywh, str) and box_xywh == WHOLE_IMAGE:
        region = image
    else:
        region = image.crop(loose_box(box_xywh, image.width, image.height))
    target = short_side_size(region.width, region.height, size)
    if target == region.size:
        return region
    return region.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)


def crop(
    image: Image.Image, record: dict[str, Any], *, landmarks: Any = None, box: Any = None
) -> Image.Image:
    """The face crop ``record`` describes, of an RGB image with its geometry (source pixel
    coordinates). Raises MissingFaceGeometry when the geometry the mode needs is absent."""
    mode = record.get("mode", "none")
    if mode == "aligned":
        return align(image, landmarks, int(record["size"]))
    if mode == "loose":
        return loose_crop(image, box, int(record["size"]))
    return image


def check_query_size(image: Image.Image, record: dict[str, Any], what: str) -> None:
    """A query given without its landmarks must already be a crop of the model's kind: an
    aligned crop has exactly the crop's size, a loose crop the crop's shorter side."""
    mode, size = record.get("mode", "none"), int(record.get("size", 0))
    w, h = image.size
    if mode == "aligned" and (w, h) != (size, size):
        raise CropError(
            f"{what}: a {w}x{h} image, but the model takes {describe(record)} face crops; pass "
            f"an aligned {size}x{size} crop, or the image with its five landmarks (--landmarks)"
        )
    if mode == "loose" and min(w, h) != size:
        raise CropError(
            f"{what}: a {w}x{h} image, but the model takes {describe(record)} face crops; pass "
            f"a loose crop whose shorter side is {size} (make-shards --crop loose)"
        )


# ---------------------------------------------------------------------------- split records

CATALOG_KEY = b"smoothap.crop"
"""The key of a split's crop record in ``index.parquet``'s schema metadata (JSON)."""
NO_CROP = {"mode": "none", "size": 0}


def split_crop(urls: str) -> dict[str, Any] | None:
    """The crop record of the split that ``urls`` names; ``NO_CROP`` for a split written
    before crops were recorded; None when its catalog cannot be read here (remote shards)."""
    # Imported here, not at the top: this module is carried alone by the exported model's
    # runtime (pipeline.serve.export), which has neither the catalog nor pyarrow. Local and
    # s3:// splits alike.
    from pipeline.data.catalog import read_catalog_metadata  # noqa: PLC0415

    try:
        meta = read_catalog_metadata(urls)
    except (ValueError, OSError):
        return None
    raw = meta.get(CATALOG_KEY)
    return json.loads(raw) if raw else dict(NO_CROP)
