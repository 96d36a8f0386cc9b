"""Turn any decoded image into the 8-bit RGB picture it shows, by stated rules.

Shards hold RGB JPEGs. PIL's ``convert("RGB")`` is not enough: it clips high-bit-depth pixels
to 255 (a 16-bit grayscale PNG became a near-white JPEG without a warning), drops an
alpha channel onto whatever colour the transparent pixels happen to store, and ignores the EXIF
orientation a camera wrote. The rules, in order:

1. **Orientation**: an EXIF orientation tag other than 1 is applied first (the image is stored
   as it is displayed; width and height in ``index.parquet`` are the displayed ones).
2. **Mode**:

   ============================  ==========================================================
   ``1``, ``L``                  gray (``1``: 0 or 255), copied to R, G and B
   ``RGB``, ``RGBX``             as is
   ``YCbCr``                     JPEG/JFIF full-range BT.601 (PIL's conversion)
   ``CMYK``                      R = (255 - C)(255 - K) / 255, same for G (M) and B (Y)
   ``P``                         the palette colours; with transparency as an alpha mode
   ``LA``, ``PA``, ``RGBA``,     composited over :data:`BACKGROUND` (white):
   ``RGBa``                      out = a * colour + (1 - a) * 255, a = alpha / 255
   ``I;16`` (``L``, ``B``,       16-bit unsigned, scaled by the type's full range:
   ``N``)                        out = v * 255 / 65535
   ``I`` (32-bit signed)         values within 0..65535 as 16-bit (PIL decodes 16-bit PGM,
                                 PPM and some PNG/TIFF data to ``I``); otherwise by the type's
                                 full range: out = (v + 2**31) * 255 / (2**32 - 1)
   ``F`` (32-bit float)          values within [0, 1]: out = v * 255; otherwise min-max:
                                 out = (v - min) / (max - min) * 255 (a constant image is 0);
                                 NaN or infinity is refused
   anything else (``LAB``, ...)  refused: :class:`UnsupportedImage`
   ============================  ==========================================================

   Scaled values are rounded to the nearest integer.

A refused image is counted and listed in ``skipped.txt`` like a corrupt one, never dropped
silently and never converted by a guess.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = 255
"""Transparent pixels become white: the usual backdrop of product photos and web images, and
what an image viewer shows; black would turn dark transparent logos into solid black squares."""

ORIENTATION_TAG = 0x0112

_GRAY = ("1", "L")
_AS_RGB = ("RGB", "RGBX", "YCbCr", "CMYK")
_ALPHA = ("LA", "PA", "RGBA", "RGBa")
_UINT16 = ("I;16", "I;16L", "I;16B", "I;16N")


class UnsupportedImage(ValueError):
    """An image whose pixels have no stated conversion to 8-bit RGB (the message says why)."""


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened image; 1 when it has none."""
    try:
        value = int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block does not make the pixels wrong: ignore it
        return 1
    return value if 1 <= value <= 8 else 1


def swaps_axes(orientation: int) -> bool:
    """Whether applying this orientation exchanges width and height (90 / 270 degree turns)."""
    return orientation in (5, 6, 7, 8)


def _gray_to_rgb(gray_u8: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray_u8[..., None], 3, axis=2), "RGB")


def _scale_to_u8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255, rounded (float64: int32 extremes stay exact)."""
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _float_to_u8(values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        raise UnsupportedImage(
            "float image (mode F) holds NaN or infinite values: no brightness scale to map to 8 bit"
        )
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return _scale_to_u8(values, 0.0, 1.0)
    if high == low:
        return np.zeros(values.shape, np.uint8)
    return _scale_to_u8(values, low, high)


def _int32_to_u8(values: np.ndarray) -> np.ndarray:
    if values.size and values.min() >= 0 and values.max() <= 65535:
        return _scale_to_u8(values, 0, 65535)
    return _scale_to_u8(values, -(2**31), 2**31 - 1)


def _composite(image: Image.Image) -> Image.Image:
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + BACKGROUND * (1.0 - alpha)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def _has_transparency(image: Image.Image) -> bool:
    palette_mode = image.palette.mode if image.palette is not None else ""
    return "transparency" in image.info or palette_mode == "RGBA"


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image that ``image`` shows (rules in the module docstring).

    Raises :class:`UnsupportedImage` for a mode without a stated rule or pixels that cannot be
    mapped (NaN), so that the caller skips and reports the file.
    """
    orientation = exif_orientation(image)
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _GRAY or mode in _AS_RGB:
        return image.convert("RGB")
    if mode == "P":
        return _composite(image) if _has_transparency(image) else image.convert("RGB")
    if mode in _ALPHA:
        return _composite(image)
    if mode in _UINT16:
        return _gray_to_rgb(_scale_to_u8(np.asarray(image), 0, 65535))
    if mode == "I":
        return _gray_to_rgb(_int32_to_u8(np.asarray(image)))
    if mode == "F":
        return _gray_to_rgb(_float_to_u8(np.asarray(image)))
    raise UnsupportedImage(
        f"image mode {mode!r} has no stated conversion to 8-bit RGB (see "
        "pipeline/data/imagemode.py); convert the file to RGB, e.g. PNG or JPEG"
    )
