"""What a dataset converter hands to the shard writer: one :class:`SourceItem` per image, and
the JPEG encoding every producer of image bytes shares (the writer, the synthetic generator)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.imagemode import to_rgb


@dataclass
class SourceItem:
    """One image to write: where it comes from and what it is."""

    class_name: str
    """The class (identity, species, product); labels are assigned from the sorted names."""
    source: str
    """Recorded in the metadata: the path as the dataset lists it (relative to its root)."""
    path: str = ""
    """The file to read; empty when the image is rendered (synthetic)."""
    origin: str = ""
    """Where the item was listed (``Ebay_train.txt:12``), for error messages."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Dataset-specific ids (template_id, media_id, supercategory, ...): json + index columns."""
    render: tuple = ()
    """Synthetic only: the arguments of ``synthetic.render_jpeg``."""


def encode_jpeg(image, quality: int) -> bytes:
    """JPEG bytes of a PIL image, fixed settings so output is reproducible. A non-RGB image is
    converted by ``imagemode.to_rgb``'s rules, never by PIL's clipping ``convert("RGB")``."""
    buf = io.BytesIO()
    to_rgb(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
