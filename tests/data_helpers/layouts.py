"""Tiny but complete copies of each dataset layout make-shards reads (images made here)."""

from __future__ import annotations

from pathlib import Path

from tests.data_helpers import write_image


def imagefolder(root: Path) -> None:
    for c, cls in enumerate(("cat", "dog")):
        for i in range(2):
            write_image(root / cls / f"{i}.jpg", seed=10 * c + i)


FACE_TEMPLATE = [38.29, 51.70, 73.53, 51.50, 56.03, 71.74, 41.55, 92.37, 70.73, 92.20]
"""Five landmarks (x1, y1, ..., x5, y5) of a face in a 112 x 112 image."""


def face_landmarks(seed: int, scale: float = 0.2) -> list[float]:
    """Landmarks of a face inside the 24 x 18 layout images (the template scaled, moved)."""
    return [round(v * scale + (seed % 3) * 0.5, 2) for v in FACE_TEMPLATE]


def face_box(seed: int) -> list[float]:
    return [4.0 + seed % 3, 3.0, 12.0, 11.0]


def vggface2(root: Path) -> None:
    """VGGFace2 with its bb_landmark/ files (quoted CSV, as released); the last training
    image has neither landmarks nor a box."""
    header = ",".join(
        f'"{c}"' for c in ["NAME_ID"] + [f"P{i}{a}" for i in range(1, 6) for a in "XY"]
    )
    for split, ids in (("train", ["n000002", "n000010"]), ("test", ["n000001"])):
        lines, marks, boxes = [], [header], ['"NAME_ID","X","Y","W","H"']
        for j, ident in enumerate(ids):
            for i in range(2):
                write_image(root / split / ident / f"{i:04d}_01.jpg", seed=j * 10 + i)
                lines.append(f"{ident}/{i:04d}_01.jpg")
                if split == "train" and j == len(ids) - 1 and i == 1:
                    continue
                name = f'"{ident}/{i:04d}_01"'
                marks.append(",".join([name, *map(str, face_landmarks(j * 10 + i))]))
                boxes.append(",".join([name, *map(str, face_box(j * 10 + i))]))
        (root / f"{split}_list.txt").write_text("\n".join(lines) + "\n")
        (root / "bb_landmark").mkdir(exist_ok=True)
        (root / "bb_landmark" / f"loose_landmark_{split}.csv").write_text("\n".join(marks) + "\n")
        (root / "bb_landmark" / f"loose_bb_{split}.csv").write_text("\n".join(boxes) + "\n")


def inaturalist(root: Path) -> None:
    for split, cats in (
        ("train", [("Plantae", "7477"), ("Aves", "2001")]),
        ("test", [("Aves", "3")]),
    ):
        lines = []
        for sup, cat in cats:
            for i in range(2):
                rel = f"train_val2018/{sup}/{cat}/{i}.jpg"
                write_image(root / rel, seed=i)
                lines.append(rel)
        (root / f"Inaturalist_{split}_set1.txt").write_text("\n".join(lines) + "\n")


def sop(root: Path) -> None:
    rows = ["image_id class_id super_class_id path"]
    for i, cls in enumerate((1, 1, 2, 2)):
        rel = f"bicycle_final/{cls}_{i}.JPG"
        write_image(root / rel, seed=i)
        rows.append(f"{i + 1} {cls} 1 {rel}")
    (root / "Ebay_train.txt").write_text("\n".join(rows[:3]) + "\n")
    (root / "Ebay_test.txt").write_text("\n".join([rows[0], *rows[3:]]) + "\n")


def ijbc(root: Path) -> None:
    meta = root / "IJBC" / "meta"
    meta.mkdir(parents=True)
    lines, five = [], []
    for i in range(1, 5):
        write_image(root / "IJBC" / "loose_crop" / f"{i}.jpg", seed=i)
        lines.append(f"{i}.jpg {1 + (i - 1) // 2} {100 + i}")
        five.append(" ".join([f"{i}.jpg", *map(str, face_landmarks(i)), f"0.{90 + i}"]))
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(lines) + "\n")
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(five) + "\n")
    (meta / "ijbc_template_pair_label.txt").write_text("1 2 0\n")


def ijb_release(
    root: Path,
    bench: str = "IJBC",
    subjects: int = 6,
    templates_per_subject: int = 3,
    size: int = 32,
    seed: int = 0,
) -> dict:
    """insightface's IJB-C (or IJB-B) release layout, small: ``<bench>/loose_crop/`` images and
    ``<bench>/meta/`` with the media list, all template pairs, the 1:N gallery and probe CSVs
    (IJB-C galleries G1, G2; IJB-B S1, S2) and ``<bench>_name_5pts_score.txt`` (image name, five
    landmarks, detector score). Each subject's faces share a base pattern; each template has two
    media of one to three images. The same arguments give the same templates for both benchmarks.

    Returns the truth: ``images`` (name -> (template, media, det_score)), ``subject`` (template ->
    subject), ``pairs`` [(t1, t2, label)], ``galleries`` {name: [template]}, ``probes`` [template].
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = bench.lower()
    meta, crops = root / bench / "meta", root / bench / "loose_crop"
    meta.mkdir(parents=True)
    crops.mkdir(parents=True)
    bases = rng.integers(0, 256, (subjects, size, size, 3))
    images, subject = {}, {}
    for s in range(subjects):
        for k in range(templates_per_subject):
            t = 1 + s * templates_per_subject + k
            subject[t] = s
            for m in range(2):
                for _ in range(int(rng.integers(1, 4))):
                    noise = rng.normal(0, 60, (size, size, 3))
                    pixels = np.clip(bases[s] + noise, 0, 255).astype(np.uint8)
                    name = f"{len(images) + 1}.jpg"
                    Image.fromarray(pixels).save(crops / name, quality=95)
                    det = float(np.round(rng.uniform(0.2, 1.0), 3))
                    images[name] = (t, 10 * t + m, det)
    (meta / f"{low}_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, (t, m, _) in images.items())
    )
    lines = []
    for n, (_, _, det) in images.items():
        marks = " ".join(f"{v:.3f}" for v in rng.uniform(8, size - 8, 10))
        lines.append(f"{n} {marks} {det:.3f}\n")
    (meta / f"{low}_name_5pts_score.txt").write_text("".join(lines))
    ts = sorted(subject)
    pairs = [(a, b, int(subject[a] == subject[b])) for a in ts for b in ts if a < b]
    (meta / f"{low}_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {c}\n" for a, b, c in pairs)
    )
    names = ("G1", "G2") if bench == "IJBC" else ("S1", "S2")
    firsts = [1 + s * templates_per_subject for s in range(subjects)]
    half = subjects // 2
    galleries = {names[0]: firsts[:half], names[1]: firsts[half:]}
    probes = [t for t in ts if t not in firsts]
    head = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    for g, members in galleries.items():
        rows = "".join(f"{t},{subject[t]},x.jpg\n" for t in members)
        (meta / f"{low}_1N_gallery_{g}.csv").write_text(head + rows)
    rows = "".join(f"{t},{subject[t]},x.jpg\n" for t in probes)
    (meta / f"{low}_1N_probe_mixed.csv").write_text(head + rows)
    return {
        "images": images,
        "subject": subject,
        "pairs": pairs,
        "galleries": galleries,
        "probes": probes,
    }


def with_det_scores(items: list, release: dict) -> list:
    """The converter's IJB-C items with the catalog column ``det_score`` of each image (from
    the release's ``name_5pts_score`` file, as the face converter records it)."""
    for item in items:
        name = item.source.split("/", 1)[1]
        item.meta["det_score"] = release["images"][name][2]
    return items


LAYOUTS = {
    "imagefolder": imagefolder,
    "vggface2": vggface2,
    "inaturalist": inaturalist,
    "sop": sop,
    "ijbc": ijbc,
}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): equal snapshots, nothing lost."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
