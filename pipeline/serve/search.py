"""``pipeline search``: the nearest gallery items of query images, from an index directory.

    pipeline search gallery/ query1.jpg query2.png --k 10 [--grid neighbours.png] [--json out.json]

Queries are embedded with the checkpoint recorded in the index's manifest (or ``--checkpoint``)
and the same decode and eval transform as the gallery. Scores mean something only when the
queries are embedded with the gallery's own weights: the query weights' identity
(``pipeline.weights.weights_sha256``) must equal the one the manifest records, else the search
is refused, naming both, unless ``--allow-other-weights`` (then every result says
``"weights_match": false``). A gallery built before galleries recorded an identity is searched
with a warning that the match cannot be checked (``"weights_match": null``); an exact index returns exactly the
evaluation's kNN (``pipeline.eval.knn``: score-descending, ties by gallery row). The grid shows
each query and its neighbours, framed green where the neighbour's class is the query's, red
where not, grey where the query's class is unknown (a query's class is known when its parent
folder is named like a gallery class, the ImageFolder convention).

Shape legend: Q queries, k neighbours, D embedding dims.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config.schema import DataConfig
from pipeline.data.converters import LANDMARK_COLUMNS, read_geometry_csv
from pipeline.data.image import decode
from pipeline.data.stream import read_shard
from pipeline.model import load_trained_model
from pipeline.plots import framed_image_grid, save_png
from pipeline.serve.gallery import embed_files
from pipeline.serve.gallery_files import MANIFEST_FILE, Gallery, read_gallery
from pipeline.serve.gallery_index import GalleryError, search_index
from pipeline.weights import IDENTITY_KEY, model_weights_record, short

THUMB = 96


class OtherWeightsError(GalleryError):
    """Queries would be embedded with weights other than the gallery's."""


@dataclass(frozen=True)
class WeightsCheck:
    """The gallery's and the query model's weights, and whether they are the same."""

    gallery: dict[str, Any]
    query: dict[str, Any]

    @property
    def match(self) -> bool | None:
        """True or False; None when the gallery records no identity (built before it did)."""
        known = self.gallery.get(IDENTITY_KEY)
        return None if not known else known == self.query[IDENTITY_KEY]

    def fields(self) -> dict[str, Any]:
        """What each result records about the weights."""
        return {
            "weights_match": self.match,
            "gallery_weights_sha256": self.gallery.get(IDENTITY_KEY),
            "query_weights_sha256": self.query[IDENTITY_KEY],
        }

    def describe(self) -> str:
        g, q = self.gallery, self.query
        return (
            f"gallery weights {g.get('path')} (sha256 {short(g.get(IDENTITY_KEY))}), query "
            f"weights {q.get('path')} (sha256 {short(q[IDENTITY_KEY])})"
        )


def check_weights(gallery: Gallery, model: Any, *, allow_other: bool = False) -> WeightsCheck:
    """Compare the query model's weights with the gallery's: refuse (:class:`OtherWeightsError`,
    one line naming both) other weights unless ``allow_other``; warn on stderr when they differ
    (allowed) or when the gallery records no identity."""
    recorded = gallery.manifest.get("weights") or {"path": gallery.manifest.get("checkpoint")}
    check = WeightsCheck(recorded, model_weights_record(model))
    if check.match is False and not allow_other:
        raise OtherWeightsError(
            f"{gallery.directory}: {check.describe()}: other weights give other scores (an "
            "image no longer finds itself at 1.0); search with the gallery's weights, rebuild "
            "the gallery with these, or pass --allow-other-weights to search anyway"
        )
    if check.match is False:
        print(f"warning: --allow-other-weights: {check.describe()} differ", file=sys.stderr)
    elif check.match is None:
        print(
            f"warning: {gallery.directory / MANIFEST_FILE} records no weights identity (built "
            f"before galleries did): the query weights (sha256 {short(check.query[IDENTITY_KEY])}) "
            "cannot be checked against the gallery's; rebuild it to have them checked",
            file=sys.stderr,
        )
    return check


def load_query_model(gallery: Gallery, checkpoint: str | None = None):
    """The gallery's model (manifest checkpoint, or ``checkpoint``); its architecture must be
    the gallery's."""
    path = checkpoint or gallery.manifest["checkpoint"]
    if not Path(path).exists():
        raise GalleryError(
            f"the checkpoint {path!r} recorded in {gallery.directory / 'manifest.json'} does not "
            "exist; pass the model's weights with --checkpoint PATH"
        )
    model = load_trained_model(path)
    if model.weights_origin.resolved_from:  # a checkpoint root: the step read, said once
        print(model.weights_origin.describe(), file=sys.stderr)
    if model.architecture != gallery.manifest["architecture"]:
        raise GalleryError(
            f"--checkpoint {path!r} is a {model.architecture} model but the gallery was embedded "
            f"with {gallery.manifest['architecture']}; use the gallery's model"
        )
    return model


def search_images(
    gallery: Gallery,
    files: list[Path],
    k: int,
    *,
    checkpoint: str | None = None,
    landmarks: list | None = None,
    allow_other_weights: bool = False,
) -> tuple[np.ndarray, np.ndarray, WeightsCheck]:
    """Top-k (scores Q x k, gallery rows Q x k) of each query file (``landmarks``: per file,
    its five landmarks or None, for a gallery of aligned faces) and the weights check
    (:func:`check_weights`: other weights than the gallery's are refused unless
    ``allow_other_weights``)."""
    for f in files:
        if not f.is_file():
            raise GalleryError(f"query {str(f)!r} does not exist; pass image files")
    model = load_query_model(gallery, checkpoint)
    check = check_weights(gallery, model, allow_other=allow_other_weights)
    spec = gallery.manifest["preprocessing"]
    crop = spec.get("face_crop") or {"mode": "none", "size": 0}
    data_cfg = DataConfig(
        image_size=int(spec["input_size"][0]),
        resize_size=int(spec["resize_shorter_side"]),
        crop=crop["mode"],
        crop_size=int(crop["size"]),
    )
    emb_QD, _, _ = embed_files(model, files, data_cfg, landmarks=landmarks)
    scores, rows = search_index(gallery.index, emb_QD, k)
    return scores, rows, check


def query_classes(gallery: Gallery, files: list[Path]) -> list[str | None]:
    """Each query's class: its parent folder's name when the gallery has a class of that name."""
    known = {c for c in gallery.items["class_name"] if c is not None}
    return [f.parent.name if f.parent.name in known else None for f in files]


def _thumb(data_or_path: bytes | Path) -> np.ndarray:
    data = data_or_path.read_bytes() if isinstance(data_or_path, Path) else data_or_path
    return np.asarray(decode(data).resize((THUMB, THUMB), Image.BILINEAR))


def gallery_thumbnails(gallery: Gallery, rows: set[int]) -> dict[int, np.ndarray]:
    """Thumbnails of gallery rows: read from their image files or back from their shards."""
    items, source = gallery.items, gallery.manifest["source"]
    out: dict[int, np.ndarray] = {}
    if "images" in source:
        return {r: _thumb(Path(items["source"][r])) for r in rows}
    root = Path(source["shards"])
    by_shard: dict[str, dict[str, int]] = {}
    for r in rows:
        by_shard.setdefault(items["source"][r], {})[items["key"][r]] = r
    for shard, wanted in sorted(by_shard.items()):
        for raw in read_shard(str(root / shard)):
            if raw.key in wanted:
                out[wanted[raw.key]] = _thumb(raw.data)
    return out


def grid_png(
    queries: list[np.ndarray],
    neighbours: list[list[np.ndarray]],
    correct: list[list[bool | None]],
    captions: list[list[str]],
    titles: list[str],
    path: Path,
) -> Path:
    """One row per query (black frame), its neighbours framed green (same class), red (other
    class) or grey (query class unknown), each captioned (score, class)."""
    colour = {True: "tab:green", False: "tab:red", None: "0.6"}
    cells = [
        [(query, "black", title)] + [(img, colour[ok], cap) for img, ok, cap in zip(row, oks, caps)]
        for query, title, row, oks, caps in zip(queries, titles, neighbours, correct, captions)
    ]
    fig, _ = framed_image_grid(cells, cell_inches=(1.7, 1.9))
    return save_png(fig, path, dpi=90)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index_dir", help="a directory written by `pipeline build-gallery`")
    parser.add_argument("images", nargs="+", help="query image files")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--checkpoint", default=None, help="default: the manifest's checkpoint")
    parser.add_argument("--grid", default=None, help="write a PNG grid of queries and neighbours")
    parser.add_argument("--json", default=None, help="write the results as JSON")
    parser.add_argument(
        "--landmarks",
        default=None,
        metavar="CSV",
        help="aligned-face galleries: NAME_ID,P1X,P1Y,...,P5Y per query (NAME_ID: the query "
        "path or file name, without extension); queries without a row must be aligned crops",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --json and --grid")
    parser.add_argument(
        "--allow-other-weights",
        action="store_true",
        help="embed the queries even with weights other than the gallery's (the results then "
        'say "weights_match": false)',
    )


def query_landmarks(csv_path: str | None, files: list[Path]) -> list | None:
    """Each query's five landmarks from ``--landmarks`` (by path, then by name), or None."""
    if not csv_path:
        return None
    rows = read_geometry_csv(Path(csv_path), LANDMARK_COLUMNS)
    return [rows.get(str(f.with_suffix(""))) or rows.get(f.stem) for f in files]


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise GalleryError(f"--k {args.k}: must be >= 1")
    for flag, out in (("--json", args.json), ("--grid", args.grid)):
        if out and Path(out).exists() and not args.force:
            raise GalleryError(
                f"{flag} {out}: the file exists; pipeline search does not overwrite files: "
                "pick another name or pass --force"
            )
    gallery = read_gallery(args.index_dir)
    files = [Path(f) for f in args.images]
    marks = query_landmarks(args.landmarks, files)
    scores, rows, check = search_images(
        gallery,
        files,
        args.k,
        checkpoint=args.checkpoint,
        landmarks=marks,
        allow_other_weights=args.allow_other_weights,
    )
    if check.match is False:
        print(f"weights_match: false ({check.describe()})")
    items = gallery.items
    classes = query_classes(gallery, files)
    results: list[dict[str, Any]] = []
    for f, cls, s_k, r_k in zip(files, classes, scores, rows):
        print(f"query {f}" + (f"  (class {cls})" if cls else ""))
        hits = []
        for rank, (s, r) in enumerate(zip(s_k, r_k), 1):
            if r < 0:
                break
            hit = {
                "rank": rank,
                "row": int(r),
                "score": float(s),
                "key": items["key"][r],
                "class_name": items["class_name"][r],
                "label": int(items["label"][r]),
                "source": items["source"][r],
            }
            hits.append(hit)
            mark = "" if cls is None else ("  +" if hit["class_name"] == cls else "  -")
            print(f"  {rank:>3}  {s:.4f}  {hit['class_name'] or '-'}  {hit['key']}{mark}")
        results.append({"query": str(f), "class_name": cls, **check.fields(), "neighbours": hits})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.grid:
        wanted = {h["row"] for res in results for h in res["neighbours"]}
        thumbs = gallery_thumbnails(gallery, wanted)
        grid_png(
            [_thumb(f) for f in files],
            [[thumbs[h["row"]] for h in res["neighbours"]] for res in results],
            [
                [
                    None if res["class_name"] is None else h["class_name"] == res["class_name"]
                    for h in res["neighbours"]
                ]
                for res in results
            ],
            [
                [f"{h['score']:.3f} {h['class_name'] or ''}"[:18] for h in res["neighbours"]]
                for res in results
            ],
            [f.name[:18] for f in files],
            Path(args.grid),
        )
        print(f"wrote {args.grid}")
    return 0
