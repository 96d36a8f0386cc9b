"""Tiny but complete copies of each dataset layout make-shards reads (images made here)."""

from __future__ import annotations

from pathlib import Path

from tests.data_helpers import write_image


def imagefolder(root: Path) -> None:
    for c, cls in enumerate(("cat", "dog")):
        for i in range(2):
            write_image(root / cls / f"{i}.jpg", seed=10 * c + i)


def vggface2(root: Path) -> None:
    for split, ids in (("train", ["n000002", "n000010"]), ("test", ["n000001"])):
        lines = []
        for j, ident in enumerate(ids):
            for i in range(2):
                write_image(root / split / ident / f"{i:04d}_01.jpg", seed=j * 10 + i)
                lines.append(f"{ident}/{i:04d}_01.jpg")
        (root / f"{split}_list.txt").write_text("\n".join(lines) + "\n")


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
    lines = []
    for i in range(1, 5):
        write_image(root / "IJBC" / "loose_crop" / f"{i}.jpg", seed=i)
        lines.append(f"{i}.jpg {1 + (i - 1) // 2} {100 + i}")
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(lines) + "\n")
    (meta / "ijbc_template_pair_label.txt").write_text("1 2 0\n")


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
