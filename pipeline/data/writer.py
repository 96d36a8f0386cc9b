"""Write one split of a dataset as WebDataset tar shards, with its ``index.parquet`` and ``sizes.json``.

Every sample is ``{__key__, jpg, cls, json}`` (see ``shards/README.md``). Samples are written
class-contiguous: all of a class's samples together, classes in a seeded random order, so that a
streaming reader can cut class groups without random access (the P x K sampler). A shard is
closed early rather than split a class that would not fit, so a class spans several shards only
when it alone holds more than ``samples_per_shard`` samples.

Images are checked (fully decoded) and optionally resized in a process pool; a corrupt or
unreadable image is skipped, written to ``skipped.txt`` with its reason and counted. A source
file that does not exist is an error (the listing and the files disagree), not a skip.
The split is written to a fresh ``<out>/<split>.partial-XXXXXX`` folder, validated, and only
then swapped in as ``<out>/<split>`` (``outdir``: overlap with the input, an existing split and
``overwrite`` are decided there), so a failed or interrupted run leaves any old split as it was
and never a split that looks complete. The shards and the tables beside them are written by
``pipeline.data.shard_sink``.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.catalog import (
    SKIPPED_FILE,
    WRITTEN_FILES,
    check_name,
)
from pipeline.data.faces import MissingFaceGeometry
from pipeline.data.image import exif_orientation, shard_pixels, swaps_axes, to_rgb
from pipeline.data.items import SourceItem, encode_jpeg
from pipeline.data.outdir import (
    ShardWriteError,  # defined beside the output checks; callers catch it from here
    check_output,
    discard_partial,
    make_partial,
    swap_in,
    write_error,
)
from pipeline.data.shard_sink import ShardSink, write_tables
from pipeline.data.storage import join
from pipeline.data.synthetic import render_jpeg
from pipeline.data.validate import validate_split

DEFAULT_MAX_SKIPPED_FRACTION = 0.01
"""make-shards fails when more than this fraction of a split's images is unreadable: a few bad
files are normal in web-scraped datasets; more usually means a wrong root or a broken copy."""


@dataclass
class WriteSummary:
    """What a split's writing produced (printed by make-shards)."""

    directory: str
    samples: int
    classes: int
    shards: int
    bytes: int
    skipped: int
    listed: int
    no_face: int = 0
    """Of the skipped: images without the landmarks / box their face crop needs."""

    def line(self) -> str:
        return (
            f"{self.directory}: {self.samples} samples, {self.classes} classes, "
            f"{self.shards} shards, {self.bytes / 1e6:.1f} MB, skipped {self.skipped} of "
            f"{self.listed} listed images"
            + (f", {self.no_face} of them without face landmarks/box" if self.no_face else "")
            + (f" (see {join(self.directory, SKIPPED_FILE)})" if self.skipped else "")
        )


# ---------------------------------------------------------------------------- image preparation


KEPT_JPEG_MODES = ("RGB", "L")
"""JPEGs stored byte for byte: any reader shows their pixels as they are. A CMYK JPEG or one with
an EXIF rotation is re-encoded, since a plain decoder would show it inverted or turned."""


def prepare_image(
    data: bytes,
    resize: int,
    quality: int,
    crop: dict[str, Any] | None = None,
    face: dict[str, Any] | None = None,
) -> tuple[bytes, int, int]:
    """Check that ``data`` decodes completely and return (jpeg bytes, width, height).

    Every image becomes 8-bit RGB by ``pipeline.data.image.to_rgb``'s rules (EXIF
    orientation applied; 16-bit, integer and float pixels scaled; alpha composited on white).
    ``resize`` > 0: re-encode with the shorter side at ``resize`` pixels. Otherwise an RGB or
    gray JPEG without rotation is kept byte for byte and anything else is re-encoded as JPEG
    (the member is named ``jpg``). Raises on undecodable or truncated data, and
    ``image.UnsupportedImage`` for pixels that have no stated conversion.

    ``crop`` (``faces.crop_record``) other than none: the decoded image cut to that face crop
    with ``face``'s geometry (``image.shard_pixels``, the pixels every query path reproduces),
    always re-encoded; ``faces.MissingFaceGeometry`` when the geometry is absent.
    """
    if crop and crop.get("mode", "none") != "none":
        face = face or {}
        cut = shard_pixels(data, crop, landmarks=face.get("landmarks"), box=face.get("box"))
        return encode_jpeg(cut, quality), cut.size[0], cut.size[1]
    image = Image.open(io.BytesIO(data))
    fmt = image.format
    orientation = exif_orientation(image)
    if resize > 0:
        w, h = image.size
        scale = resize / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        # JPEG DCT-domain downscaling first: several times faster on large photos. The draft
        # size is in stored orientation; the target below is the displayed one.
        image.draft("RGB", size)
        image.load()
        image = to_rgb(image)
        if swaps_axes(orientation):
            size = (size[1], size[0])
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return encode_jpeg(image, quality), size[0], size[1]
    image.load()  # a full decode: truncated files fail here, not during training
    if fmt == "JPEG" and image.mode in KEPT_JPEG_MODES and orientation == 1:
        return data, image.size[0], image.size[1]
    image = to_rgb(image)
    return encode_jpeg(image, quality), image.size[0], image.size[1]


NO_FACE = "no face geometry"
"""The reason given in ``skipped.txt`` for an image the dataset gives no landmarks / box for."""


def _prepare(
    item: SourceItem, resize: int, quality: int, crop: dict[str, Any] | None = None
) -> tuple[str, Any]:
    """Worker: ('ok', (bytes, w, h)) | ('bad', reason) | ('missing', message)."""
    try:
        if item.render:
            data = render_jpeg(*item.render)
            if resize <= 0:
                w, h = Image.open(io.BytesIO(data)).size
                return "ok", (data, w, h)
        else:
            with open(item.path, "rb") as f:
                data = f.read()
        return "ok", prepare_image(data, resize, quality, crop, item.face)
    except MissingFaceGeometry as e:
        return "bad", f"{NO_FACE} ({crop and crop['mode']} crop): {e}"
    except FileNotFoundError:
        where = f" (listed at {item.origin})" if item.origin else ""
        return "missing", f"{item.path}{where} does not exist"
    except Exception as e:  # any decoder error means: this file is unusable, skip it
        return "bad", f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------- writing


def class_order(items: list[SourceItem], seed: int) -> tuple[list[SourceItem], dict[str, int]]:
    """Items grouped by class, classes in a seeded random order, each class's items in listed
    order; and the labels: class name -> position in the sorted class names."""
    by_class: dict[str, list[SourceItem]] = {}
    for item in items:
        by_class.setdefault(item.class_name, []).append(item)
    names = sorted(by_class)
    labels = {name: i for i, name in enumerate(names)}
    order = np.random.default_rng(seed).permutation(len(names))
    ordered = [item for i in order for item in by_class[names[i]]]
    return ordered, labels


def _results(
    items: list[SourceItem], resize: int, quality: int, workers: int, crop: dict | None
) -> Iterator[tuple[str, Any]]:
    face = {"crop": crop} if crop else {}  # whole images: the call as it always was
    fn = partial(_prepare, resize=resize, quality=quality, **face)
    if workers <= 1:
        yield from map(fn, items)
        return
    # fork: workers start in milliseconds and need nothing from the parent but the items.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=max(1, min(64, len(items) // (workers * 8))))


def write_split(
    items: list[SourceItem],
    out: str | Path,
    *,
    name: str,
    split: str,
    samples_per_shard: int = 1000,
    resize: int = 0,
    quality: int = 90,
    workers: int = 1,
    seed: int = 0,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
    progress: bool = True,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    in_order: bool = False,
    prepared: Callable[[list[SourceItem]], Iterator[tuple[str, Any]]] | None = None,
    crop: dict[str, Any] | None = None,
) -> WriteSummary:
    """Write ``items`` as the split ``<out>/<split>`` and return its summary.

    Labels are the positions of the class names in sorted order (0..C-1 within this split).
    ``extra_files``: name -> function writing that file into the split directory (IJB-C's pair
    and gallery/probe tables; names from ``index.WRITTEN_FILES``, so that a later overwrite may
    remove them). ``inputs``: the dataset's folders, which the output must not overlap.
    ``overwrite``: replace an existing split (only files the writer writes; see ``outdir``).
    ``in_order``: items in write order; ``prepared(ordered)``: their images (arrays: ``parts``).
    ``crop``: the face crop (``faces.crop_record``), recorded in the catalog's metadata; an
    image without its geometry is skipped and counted (``no face geometry``), never uncropped.

    Raises ShardWriteError, before anything is written, for an output that overlaps an input,
    an existing split without ``overwrite``, a split folder holding a file the writer did not
    write, or an unwritable output; and while writing when a listed file is missing, nothing
    could be written, more than ``max_skipped_fraction`` of the images are unreadable or the
    written split fails validation (in these two cases the partial folder is kept for
    inspection and named in the message). Any old split is left as it was on every failure.
    """
    _check_request(items, name, split, samples_per_shard, quality, extra_files)
    check_output(out, split, overwrite=overwrite, inputs=inputs)
    partial_dir = make_partial(out, split)
    try:
        written = _write_files(
            items,
            partial_dir,
            name=name,
            split=split,
            samples_per_shard=samples_per_shard,
            resize=resize,
            quality=quality,
            workers=workers,
            seed=seed,
            progress=progress,
            extra_files=extra_files,
            in_order=in_order,
            prepared=prepared,
            crop=crop,
        )
    except BaseException as e:  # KeyboardInterrupt too: an interrupted write leaves no debris
        with contextlib.suppress(OSError):
            discard_partial(partial_dir)
        if isinstance(e, OSError):
            raise write_error(e, out) from None
        raise
    left = _check_and_swap_in(
        written, partial_dir, out, split, overwrite, max_skipped_fraction, workers
    )
    if left:
        warnings.warn(
            f"{len(left)} file(s) appeared in the old split while writing and were left in "
            f"{Path(left[0]).parent}: {left[0]}, ...",
            stacklevel=2,
        )
    return _summary(written, Path(out) / split, listed=len(items))


def _summary(written: tuple, final: Path, listed: int) -> WriteSummary:
    """The summary of a written split from ``_write_files``' result."""
    rows, shard_names, skipped, total_bytes = written
    return WriteSummary(
        directory=str(final),
        samples=len(rows),
        classes=len({r["label"] for r in rows}),
        shards=len(shard_names),
        bytes=total_bytes,
        skipped=len(skipped),
        listed=listed,
        no_face=sum(NO_FACE in line for line in skipped),
    )


def _check_request(
    items: list[SourceItem],
    name: str,
    split: str,
    samples_per_shard: int,
    quality: int,
    extra_files: dict[str, Callable[[Path], None]] | None,
) -> None:
    """Refuse :func:`write_split`'s arguments that cannot make a split, before anything is
    written (ValueError; ShardWriteError for an empty listing)."""
    check_name("dataset name", name)
    check_name("split", split)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality={quality}: JPEG quality must be in 1..100")
    if not items:
        raise ShardWriteError(f"split {split!r} of {name!r} lists no images; check --root")
    unknown = sorted(set(extra_files or {}) - set(WRITTEN_FILES))
    if unknown:
        raise ValueError(f"extra file {unknown[0]!r}: use one of {', '.join(WRITTEN_FILES)}")


def _check_and_swap_in(
    written: tuple,
    partial_dir: Path,
    out: str | Path,
    split: str,
    overwrite: bool,
    max_skipped_fraction: float,
    workers: int,
) -> list[str]:
    """Check the complete partial folder and swap it in as ``<out>/<split>``; return the files
    ``swap_in`` left behind. A failure keeps the partial folder and names it."""
    try:
        _check_written(written, partial_dir, split, max_skipped_fraction, workers)
        return swap_in(partial_dir, out, split, overwrite=overwrite)
    except ShardWriteError as e:
        kept = "" if str(partial_dir) in str(e) else f" (the new output is kept in {partial_dir})"
        raise ShardWriteError(f"{e}{kept}") from None
    except OSError as e:
        raise write_error(e, out) from None


def _write_files(
    items: list[SourceItem],
    partial_dir: Path,
    *,
    name: str,
    split: str,
    samples_per_shard: int,
    resize: int,
    quality: int,
    workers: int,
    seed: int,
    progress: bool,
    extra_files: dict[str, Callable[[Path], None]] | None,
    in_order: bool = False,
    prepared: Callable[[list[SourceItem]], Iterator[tuple[str, Any]]] | None = None,
    crop: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[str], list[str], int]:
    """Write shards, skipped.txt, index.parquet, sizes.json and the extra files into
    ``partial_dir``; return (index rows, shard names, skipped lines, total image bytes)."""
    ordered, labels = class_order(items, seed)
    if in_order:
        ordered = list(items)
    class_sizes: dict[str, int] = {}
    for item in ordered:
        class_sizes[item.class_name] = class_sizes.get(item.class_name, 0) + 1
    sink = ShardSink(partial_dir, name, split, samples_per_shard, labels, class_sizes)
    skipped: list[str] = []
    bar = tqdm(
        total=len(ordered),
        desc=f"{name}/{split}",
        unit="img",
        disable=not progress,
        file=sys.stderr,
    )
    try:
        for item, (status, payload) in zip(
            ordered,
            prepared(ordered) if prepared else _results(ordered, resize, quality, workers, crop),
            strict=True,
        ):
            bar.update(1)
            if status == "missing":
                raise ShardWriteError(
                    f"{payload}: the dataset's list and its files disagree; "
                    "check --root and that the copy is complete"
                )
            if status == "bad":
                skipped.append(f"{item.path or item.source}\t{payload}")
                continue
            sink.add(item, *payload)
    finally:
        bar.close()
        sink.close()

    (partial_dir / SKIPPED_FILE).write_text("".join(line + "\n" for line in skipped))
    if sink.rows:  # else refused by _check_written
        write_tables(partial_dir, items, sink, extra_files, crop)
    return sink.rows, sink.shard_names, skipped, sink.total_bytes


def _check_written(
    written: tuple, partial_dir: Path, split: str, max_skipped_fraction: float, workers: int
) -> None:
    """Refuse to swap in a split with too many unreadable images, or one that does not pass
    ``validate-shards``'s checks (read back with tarfile: what training will see)."""
    rows, _, skipped, _ = written
    if not rows:
        raise ShardWriteError(
            f"no image of split {split!r} could be read ({len(skipped)} unreadable, listed in "
            f"{partial_dir / SKIPPED_FILE}); check --root and the image files"
        )
    listed = len(rows) + len(skipped)
    fraction = len(skipped) / listed
    if fraction > max_skipped_fraction:
        raise ShardWriteError(
            f"{len(skipped)} of {listed} images ({fraction:.1%}) of split {split!r} are "
            f"unreadable, above the limit of {max_skipped_fraction:.1%}; they are listed in "
            f"{partial_dir / SKIPPED_FILE} (partial output kept in {partial_dir}). Fix or remove "
            "them, or raise --max-skipped-fraction"
        )
    _, problems = validate_split(partial_dir, workers=workers)
    if problems:
        raise ShardWriteError(
            f"the written split fails validation ({len(problems)} problems, first: "
            f"{problems[0]}); nothing was replaced, the output is kept in {partial_dir}. "
            "This is a bug or a failing disk: report it with that folder"
        )
