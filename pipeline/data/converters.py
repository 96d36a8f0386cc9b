"""List the images of a dataset split from the dataset's own published layout.

Each ``list_*`` function returns ``(items, extra_files)``: ``SourceItem`` s for
``writer.write_split`` and files to write beside the shards (IJB-C's protocol tables). Only the
layout is checked here (list files, their format, directories); the images are read, checked
and skipped if unreadable by the writer, and a listed file that does not exist stops it.
Every error names the path (and line) and what was expected.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data import faces
from pipeline.data.items import SourceItem
from pipeline.errors import UserError


class LayoutError(UserError, ValueError):
    """A dataset directory does not have the expected layout; the message says what is expected."""


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise LayoutError(f"{path} does not exist; expected {what}")
    return path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise LayoutError(f"{path} is not a directory; expected {what}")
    return path


def _inside_root(rel: str, list_file: Path, n: int) -> str:
    """``rel``, a path a list file gives relative to ``--root``, if it stays inside the root.

    A downloaded list file is not trusted: an absolute path or a ``..`` would make make-shards
    read (and publish in a shard) any file this user can read. The check is on the path as
    written; symlinks inside the root are followed, since datasets keep images on other disks.
    """
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    drive = bool(parts) and len(parts[0]) == 2 and parts[0][1] == ":"  # C:\...
    if rel.startswith(("/", "\\")) or drive or ".." in parts:
        raise LayoutError(
            f"{list_file}:{n}: path {rel!r} leaves --root (an absolute path or '..'); list "
            "files name images relative to --root: fix the line, or use the dataset's own list file"
        )
    return rel


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-empty lines."""
    with open(path, encoding="utf-8") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def list_vggface2(root: Path, split: str, crop: str = "none") -> list[SourceItem]:
    """``<root>/<split>_list.txt`` (``identity/image.jpg`` a line), images in ``<root>/<split>/``.

    With ``crop`` aligned / loose, the dataset's own geometry files are read:
    ``bb_landmark/loose_landmark_<split>.csv`` (five landmarks) or ``bb_landmark/
    loose_bb_<split>.csv`` (the face box), under ``root`` or ``root/meta``."""
    list_file = _require_file(
        root / f"{split}_list.txt", "VGGFace2's list file, one `identity/image.jpg` a line"
    )
    image_dir = _require_dir(root / split, f"VGGFace2's {split}/<identity>/<image>.jpg tree")
    items = []
    for n, line in _lines(list_file):
        parts = _inside_root(line, list_file, n).split("/")
        if len(parts) != 2 or not all(parts):
            raise LayoutError(f"{list_file}:{n}: {line!r} is not of the form identity/image.jpg")
        items.append(
            SourceItem(
                class_name=parts[0],
                source=f"{split}/{line}",
                path=str(image_dir / line),
                origin=f"{list_file}:{n}",
            )
        )
    if crop != "none":
        _attach_geometry(items, _vggface2_geometry(root, split, crop), f"{split}/")
    return items


# ---------------------------------------------------------------------------- face geometry

LANDMARK_COLUMNS = [f"P{i}{a}" for i in range(1, 6) for a in ("X", "Y")]
BOX_COLUMNS = ["X", "Y", "W", "H"]


def _name_key(name: str) -> str:
    """Geometry files name images without their extension (``n000002/0001_01``)."""
    return str(Path(name.strip()).with_suffix(""))


def read_geometry_csv(path: Path, columns: list[str], optional: tuple[str, ...] = ()) -> dict:
    """``NAME_ID`` -> [the ``columns`` as floats] (+ ``optional`` ones where present) of a
    VGGFace2-style CSV (a header line, then one quoted or plain row per image)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip().upper() for h in next(reader, [])]
        missing = [c for c in ["NAME_ID", *columns] if c not in header]
        if missing:
            raise LayoutError(
                f"{path}:1: header {header} lacks {missing}; expected NAME_ID, "
                f"{', '.join(columns)}{''.join(', ' + c for c in optional)}"
            )
        at = [header.index(c) for c in (*columns, *(c for c in optional if c in header))]
        name_at = header.index("NAME_ID")
        out: dict[str, list[float]] = {}
        for n, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                out[_name_key(row[name_at])] = [float(row[i]) for i in at]
            except (ValueError, IndexError):
                raise LayoutError(
                    f"{path}:{n}: {row}; expected a name and {len(at)} numbers"
                ) from None
    return out


_GEOMETRY_DIRS = ("bb_landmark", "meta/bb_landmark")


def _geometry_file(root: Path, name: str) -> Path:
    for base in _GEOMETRY_DIRS:
        if (root / base / name).is_file():
            return root / base / name
    return _require_file(
        root / "bb_landmark" / name, "VGGFace2's bb_landmark/ file (from its meta release)"
    )


def _vggface2_geometry(root: Path, split: str, crop: str) -> dict[str, dict]:
    """Landmarks (required for aligned; in the catalog whenever the file is there) and, for
    loose, the boxes."""
    out: dict[str, dict] = {}
    name = f"loose_landmark_{split}.csv"
    if crop == "aligned" or any((root / d / name).is_file() for d in _GEOMETRY_DIRS):
        for k, v in read_geometry_csv(_geometry_file(root, name), LANDMARK_COLUMNS).items():
            out[k] = {"landmarks": v}
    if crop == "loose":
        boxes = read_geometry_csv(_geometry_file(root, f"loose_bb_{split}.csv"), BOX_COLUMNS)
        for k, v in boxes.items():
            out.setdefault(k, {})["box"] = v
    return out


def _attach_geometry(items: list[SourceItem], geometry: dict[str, dict], prefix: str = "") -> None:
    """Give each item its landmarks / box / detector score, looked up by its path (without
    extension) relative to the dataset; an item without any keeps none: the writer counts and
    lists it, it is never stored uncropped. Landmarks and score also go into the catalog."""
    for item in items:
        found = geometry.get(_name_key(item.source.removeprefix(prefix)), {})
        item.face = {k: v for k, v in found.items() if k in ("landmarks", "box")}
        item.meta["landmarks_5pt"] = found.get("landmarks")
        item.meta["det_score"] = found.get("score")


INAT_LAYOUT = "train_val2018/<supercategory>/<category>/<file>.jpg"
INAT_LEVELS = 4


def list_inaturalist(root: Path, split: str) -> list[SourceItem]:
    """Smooth-AP's split files ``Inaturalist_{train,test}_set1.txt`` under ``root``: one path a line,
    relative to ``root`` (``train_val2018/<supercategory>/<category>/<file>.jpg``); the class
    is the category folder, the super-category is kept as metadata."""
    if split not in ("train", "test"):
        raise LayoutError(f"iNaturalist split {split!r}: the Smooth-AP split files are train/test")
    list_file = _require_file(
        root / f"Inaturalist_{split}_set1.txt",
        "the Smooth-AP iNaturalist 2018 split file (one image path a line, relative to --root)",
    )
    items = []
    for n, line in _lines(list_file):
        parts = _inside_root(line, list_file, n).split("/")
        # Exactly four levels: with one missing (train_val2018/Plantae/x.jpg) the class would
        # silently become the super-category folder.
        if len(parts) != INAT_LEVELS or not all(parts):
            raise LayoutError(
                f"{list_file}:{n}: {line!r} is not of the form {INAT_LAYOUT} ({len(parts)} "
                f"path levels, expected {INAT_LEVELS}: the class is the <category> folder); "
                "fix the line, or use the Smooth-AP split file whose paths are relative to --root"
            )
        items.append(
            SourceItem(
                class_name=parts[-2],
                source=line,
                path=str(root / line),
                origin=f"{list_file}:{n}",
                meta={"supercategory": parts[-3]},
            )
        )
    return items


SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def list_sop(root: Path, split: str) -> list[SourceItem]:
    """Stanford Online Products: ``Ebay_{train,test}.txt`` (header ``image_id class_id
    super_class_id path``, then space-separated rows), images relative to ``root``."""
    if split not in ("train", "test"):
        raise LayoutError(f"SOP split {split!r}: the list files are Ebay_train.txt / Ebay_test.txt")
    list_file = _require_file(
        root / f"Ebay_{split}.txt", "Stanford Online Products' list file (Ebay_train.txt style)"
    )
    lines = _lines(list_file)
    if not lines or lines[0][1].split() != SOP_HEADER:
        raise LayoutError(
            f"{list_file}:1: header {lines[0][1] if lines else ''!r}; expected "
            f"{' '.join(SOP_HEADER)!r}"
        )
    items = []
    for n, line in lines[1:]:
        fields = line.split()
        try:
            if len(fields) != 4:
                raise ValueError
            image_id, class_id, super_id = (int(x) for x in fields[:3])
        except ValueError:
            raise LayoutError(
                f"{list_file}:{n}: {line!r}; expected 4 fields: three integers and a path"
            ) from None
        _inside_root(fields[3], list_file, n)
        items.append(
            SourceItem(
                class_name=str(class_id),
                source=fields[3],
                path=str(root / fields[3]),
                origin=f"{list_file}:{n}",
                meta={"image_id": image_id, "class_id": class_id, "super_class_id": super_id},
            )
        )
    return items


IJB_GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
"""The 1:N galleries of insightface's IJB-C and IJB-B releases (the same layout otherwise)."""


def ijb_1n_files(bench: str) -> dict[str, str]:
    """Table name -> the release's 1:N CSV in ``meta/`` (``ijbc_1N_gallery_G1.csv``, ...)."""
    low = bench.lower()
    files = {f"gallery_{g}": f"{low}_1N_gallery_{g}.csv" for g in IJB_GALLERIES[bench]}
    return {**files, "probe_mixed": f"{low}_1N_probe_mixed.csv"}


def _ints(path: Path, n: int, line: str, count: int, what: str) -> list[int]:
    fields = line.replace(",", " ").split()
    try:
        if len(fields) < count:
            raise ValueError
        return [int(x) for x in fields[:count]]
    except ValueError:
        raise LayoutError(f"{path}:{n}: {line!r}; expected {what}") from None


def _read_1n(path: Path) -> list[tuple[int, int]]:
    """Unique (template_id, subject_id) rows of an IJB-C 1:N gallery / probe CSV."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip().upper() for h in next(reader, [])]
        if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
            raise LayoutError(
                f"{path}:1: header {header}; expected TEMPLATE_ID and SUBJECT_ID columns"
            )
        t, s = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        rows: dict[tuple[int, int], None] = {}
        for n, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                rows[(int(row[t]), int(row[s]))] = None
            except (ValueError, IndexError):
                raise LayoutError(
                    f"{path}:{n}: {row}; expected integer TEMPLATE_ID and SUBJECT_ID"
                ) from None
    return list(rows)


def _parquet_writer(columns: dict[str, list]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        pq.write_table(pa.table({k: pa.array(v, pa.int64()) for k, v in columns.items()}), path)

    return write


def read_ijbc_5pts(path: Path) -> dict[str, dict]:
    """insightface's ``ijbc_name_5pts_score.txt``: ``image_name x1 y1 ... x5 y5 score`` a line
    -> {name without extension: {"landmarks": [10 floats], "score": float}}."""
    out = {}
    for n, line in _lines(path):
        fields = line.split()
        try:
            if len(fields) != 12:
                raise ValueError
            values = [float(x) for x in fields[1:]]
        except ValueError:
            raise LayoutError(
                f"{path}:{n}: {line!r}; expected image_name, 10 landmark coordinates and a "
                "detector score"
            ) from None
        out[_name_key(fields[0])] = {"landmarks": values[:10], "score": values[10]}
    return out


def list_ijbc(
    root: Path, split: str, crop: str = "none", bench: str = "IJBC"
) -> tuple[list[SourceItem], dict]:
    """IJB-C (``bench`` IJBC) or IJB-B (IJBB: the same layout, ``IJBB/`` and ``ijbb_`` names,
    galleries S1 and S2): ``IJBC/meta/ijbc_face_tid_mid.txt`` (``image_name template_id media_id``),
    ``IJBC/meta/ijbc_template_pair_label.txt`` (``template1 template2 label``), optionally the
    1:N CSVs ``IJBC/meta/ijbc_1N_{gallery_G1,gallery_G2,probe_mixed}.csv``, images in
    ``IJBC/loose_crop/``. ``root`` is the directory holding ``IJBC/`` (or ``IJBC`` itself).

    Each image's template and media ids (and subject id, -1 where no 1:N file names its
    template) go into its metadata; the class is the subject (``unknown`` when not known).
    Beside the shards: ``pairs.parquet`` (template1, template2, label) and, per 1:N file,
    ``<gallery_G1|gallery_G2|probe_mixed>.parquet`` (template_id, subject_id; IJB-B:
    ``gallery_S1``, ``gallery_S2``).

    ``IJBC/meta/ijbc_name_5pts_score.txt`` gives each image's five landmarks and detector score
    (catalog columns ``landmarks_5pt``, ``det_score``; required for ``crop`` aligned). The
    release's images are loose crops already: ``crop`` loose resizes them as they are.
    """
    low = bench.lower()
    base = root / bench if (root / bench).is_dir() else root
    meta_dir = _require_dir(base / "meta", f"{bench}/meta/ with the {bench} protocol files")
    image_dir = _require_dir(base / "loose_crop", f"{bench}/loose_crop/ with the face crops")
    tid_mid = _require_file(
        meta_dir / f"{low}_face_tid_mid.txt", "one `image_name template_id media_id` a line"
    )
    pairs_file = _require_file(
        meta_dir / f"{low}_template_pair_label.txt", "one `template1 template2 label` a line"
    )
    pairs = [
        _ints(pairs_file, n, line, 3, "three integers: template1 template2 label")
        for n, line in _lines(pairs_file)
    ]
    extra = {
        "pairs.parquet": _parquet_writer(
            {
                "template1": [p[0] for p in pairs],
                "template2": [p[1] for p in pairs],
                "label": [p[2] for p in pairs],
            }
        )
    }
    subject_of: dict[int, int] = {}
    for name, fname in ijb_1n_files(bench).items():
        path = meta_dir / fname
        if not path.is_file():
            continue  # 1:N identification is optional; make-shards reports which were found
        rows = _read_1n(path)
        subject_of.update(rows)
        extra[f"{name}.parquet"] = _parquet_writer(
            {"template_id": [r[0] for r in rows], "subject_id": [r[1] for r in rows]}
        )
    items = []
    for n, line in _lines(tid_mid):
        fields = line.split()
        if len(fields) != 3:
            raise LayoutError(f"{tid_mid}:{n}: {line!r}; expected image_name template_id media_id")
        template, media = _ints(
            tid_mid, n, " ".join(fields[1:]), 2, "integer template and media ids"
        )
        subject = subject_of.get(template, -1)
        items.append(
            SourceItem(
                class_name=f"subject{subject}" if subject >= 0 else "unknown",
                source=f"loose_crop/{fields[0]}",
                path=str(image_dir / fields[0]),
                origin=f"{tid_mid}:{n}",
                meta={"template_id": template, "media_id": media, "subject_id": subject},
            )
        )
    five = meta_dir / f"{low}_name_5pts_score.txt"
    if crop == "aligned" or five.is_file():
        what = "insightface's five landmarks and detector score per image (--crop aligned)"
        _attach_geometry(items, read_ijbc_5pts(_require_file(five, what)), "loose_crop/")
    if crop == "loose":
        for item in items:
            item.face = {"box": faces.WHOLE_IMAGE}
    return items, extra


def list_imagefolder(root: Path, split: str) -> list[SourceItem]:
    """``<root>/<class>/<image>`` (images may sit in sub-folders of a class folder); any file
    extension PIL registers is an image, other files are ignored."""
    extensions = {e.lower() for e in Image.registered_extensions()}
    _require_dir(root, "an ImageFolder tree <root>/<class>/<image>")
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    if stray:
        raise LayoutError(
            f"{root} holds images directly ({stray[0]}, ...); expected <root>/<class>/<image>: "
            "move them into a folder named after their class"
        )
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for fname in sorted(filenames):
                if Path(fname).suffix.lower() in extensions:
                    path = Path(dirpath) / fname
                    items.append(
                        SourceItem(
                            class_name=class_dir.name,
                            source=str(path.relative_to(root)),
                            path=str(path),
                        )
                    )
    if not items:
        raise LayoutError(f"{root} has no images in class folders; expected <root>/<class>/<image>")
    return items


def face_csv_geometry(landmarks: str | None, boxes: str | None) -> dict[str, dict]:
    """Geometry of any dataset from CSVs with VGGFace2's columns, names relative to --root:
    ``--landmarks`` (NAME_ID, P1X, P1Y, ..., P5X, P5Y, optional SCORE) and ``--boxes``
    (NAME_ID, X, Y, W, H)."""
    out: dict[str, dict] = {}
    if landmarks:
        path = _require_file(Path(landmarks), "a landmarks CSV (NAME_ID,P1X,P1Y,...,P5Y)")
        for k, v in read_geometry_csv(path, LANDMARK_COLUMNS, ("SCORE",)).items():
            out.setdefault(k, {})["landmarks"] = v[:10]
            if len(v) > 10:
                out[k]["score"] = v[10]
    if boxes:
        path = _require_file(Path(boxes), "a boxes CSV (NAME_ID,X,Y,W,H)")
        for k, v in read_geometry_csv(path, BOX_COLUMNS).items():
            out.setdefault(k, {})["box"] = v
    return out


def list_split(
    fmt: str,
    root: str | Path,
    split: str,
    crop: str = "none",
    landmarks: str | None = None,
    boxes: str | None = None,
) -> tuple[list[SourceItem], dict]:
    """Items and extra files of split ``split`` of a dataset of format ``fmt`` at ``root``;
    with a face ``crop``, each item carries its landmarks / box (``SourceItem.face``), from
    the dataset's own files or from the ``landmarks`` / ``boxes`` CSVs."""
    root = _require_dir(Path(root), f"the {fmt} dataset's root directory (--root)")
    if landmarks or boxes:
        items, extra = list_split(fmt, root, split)
        _attach_geometry(items, face_csv_geometry(landmarks, boxes))
        return items, extra
    if fmt in ("ijbc", "ijbb"):
        return list_ijbc(root, split, crop, bench=fmt.upper())
    if fmt == "vggface2":
        return list_vggface2(root, split, crop), {}
    if crop != "none":
        raise LayoutError(
            f"--crop {crop} needs each image's face geometry: give --landmarks CSV (aligned) "
            "or --boxes CSV (loose) with NAME_ID relative to --root"
        )
    listers = {
        "vggface2": list_vggface2,
        "inaturalist": list_inaturalist,
        "sop": list_sop,
        "imagefolder": list_imagefolder,
    }
    if fmt not in listers:
        raise LayoutError(f"unknown format {fmt!r}; use one of {', '.join(listers)}, ijbc, ijbb")
    return listers[fmt](root, split), {}
