"""Every converter on a tiny copy of its dataset's layout (images made here), and its errors."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.data.catalog import IJBC_TABLES, read_index
from pipeline.data.converters import IJB_GALLERIES, LayoutError, ijb_1n_files, list_split
from tests.data_helpers import write_image
from tests.data_helpers.layouts import face_landmarks


def _make(fmt: str, root: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "make-shards",
            fmt,
            "--root",
            str(root),
            "--out",
            str(out),
            "--workers",
            "1",
            "--no-progress",
            *extra,
        ]
    )


def _rows(split_dir: Path) -> list[dict]:
    return read_index(str(split_dir)).to_pylist()


def _first_json(split_dir: Path) -> dict:
    shard = sorted(split_dir.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        return json.loads(tar.extractfile(member).read())


def test_vggface2(tmp_path):
    root = tmp_path / "vgg"
    for split, ids in (("train", ["n000002", "n000010"]), ("test", ["n000001"])):
        lines = []
        for j, ident in enumerate(ids):
            for i in range(3):
                write_image(root / split / ident / f"{i:04d}_01.jpg", seed=j * 10 + i)
                lines.append(f"{ident}/{i:04d}_01.jpg")
        (root / f"{split}_list.txt").write_text("\n".join(lines) + "\n")
    assert _make("vggface2", root, tmp_path / "out") == 0
    train, test = _rows(tmp_path / "out" / "train"), _rows(tmp_path / "out" / "test")
    assert sorted({r["class_name"] for r in train}) == ["n000002", "n000010"]
    assert {r["class_name"] for r in test} == {"n000001"} and len(test) == 3
    assert sorted(r["source"] for r in train)[0] == "train/n000002/0000_01.jpg"
    assert (tmp_path / "out" / "train" / "vggface2-train-000000.tar").is_file()
    # errors: a list line of the wrong form, a missing list, a listed file that does not exist
    (root / "test_list.txt").write_text("n000001/0000_01.jpg\nno_identity.jpg\n")
    with pytest.raises(
        LayoutError,
        match=r"test_list.txt:2: 'no_identity.jpg' is not of the form identity/image.jpg",
    ):
        list_split("vggface2", root, "test")
    with pytest.raises(
        LayoutError, match=r"val_list.txt does not exist; expected VGGFace2's list file"
    ):
        list_split("vggface2", root, "val")
    (root / "val_list.txt").write_text("n000001/0000_01.jpg\n")
    with pytest.raises(LayoutError, match=r"val is not a directory; expected VGGFace2's val/"):
        list_split("vggface2", root, "val")
    (root / "test_list.txt").write_text("n000001/0000_01.jpg\nn000001/9999_01.jpg\n")
    assert _make("vggface2", root, tmp_path / "o2", "--split", "test") == 1


def test_missing_listed_image_message(tmp_path, capsys):
    root = tmp_path / "vgg"
    write_image(root / "test" / "a" / "1.jpg")
    (root / "test_list.txt").write_text("a/1.jpg\na/2.jpg\n")
    assert _make("vggface2", root, tmp_path / "o", "--split", "test") == 1
    err = capsys.readouterr().err
    assert "test/a/2.jpg (listed at" in err and "test_list.txt:2) does not exist" in err
    assert not (tmp_path / "o" / "test").exists()


def test_inaturalist(tmp_path):
    root = tmp_path / "inat"
    lines = {"train": [], "test": []}
    for split, cats in (
        ("train", [("Plantae", "7477"), ("Aves", "2001")]),
        ("test", [("Aves", "3")]),
    ):
        for sup, cat in cats:
            for i in range(2):
                rel = f"train_val2018/{sup}/{cat}/{i}.jpg"
                write_image(root / rel, seed=i)
                lines[split].append(rel)
        (root / f"Inaturalist_{split}_set1.txt").write_text("\n".join(lines[split]) + "\n")
    assert _make("inaturalist", root, tmp_path / "out") == 0
    rows = _rows(tmp_path / "out" / "train")
    assert {(r["class_name"], r["supercategory"]) for r in rows} == {
        ("7477", "Plantae"),
        ("2001", "Aves"),
    }
    assert sorted((tmp_path / "out" / "train").glob("*.tar"))[0].name == "inat-train-000000.tar"
    assert _first_json(tmp_path / "out" / "test")["supercategory"] == "Aves"
    (root / "Inaturalist_test_set1.txt").write_text("x.jpg\n")
    with pytest.raises(
        LayoutError,
        match=r"Inaturalist_test_set1.txt:1: 'x.jpg' is not of the form train_val2018/<supercategory>/<category>/<file>.jpg",
    ):
        list_split("inaturalist", root, "test")
    (root / "Inaturalist_test_set1.txt").unlink()
    with pytest.raises(
        LayoutError, match=r"Inaturalist_test_set1.txt does not exist; expected the Smooth-AP"
    ):
        list_split("inaturalist", root, "test")


def test_inaturalist_line_with_a_missing_level_is_refused(tmp_path):
    root = tmp_path / "inat"
    write_image(root / "train_val2018" / "Plantae" / "0.jpg")  # the file exists: only the list
    (root / "Inaturalist_train_set1.txt").write_text(
        "train_val2018/Aves/2001/0.jpg\n\ntrain_val2018/Plantae/0.jpg\n"
    )
    with pytest.raises(
        LayoutError,
        match=r"Inaturalist_train_set1.txt:3: 'train_val2018/Plantae/0.jpg' is not of the form "
        r"train_val2018/<supercategory>/<category>/<file>.jpg \(3 path levels, expected 4: "
        r"the class is the <category> folder\)",
    ):
        list_split("inaturalist", root, "train")
    (root / "Inaturalist_train_set1.txt").write_text("x/train_val2018/Aves/2001/0.jpg\n")
    with pytest.raises(LayoutError, match=r":1: .*\(5 path levels, expected 4"):
        list_split("inaturalist", root, "train")


def test_sop(tmp_path):
    root = tmp_path / "sop"
    rows = ["image_id class_id super_class_id path"]
    for i, (cls, sup) in enumerate([(1, 1), (1, 1), (2, 1), (2, 1), (11319, 3), (11319, 3)]):
        rel = f"bicycle_final/{cls}_{i}.JPG"
        write_image(root / rel, seed=i)
        rows.append(f"{i + 1} {cls} {sup} {rel}")
    (root / "Ebay_train.txt").write_text("\n".join(rows[:5]) + "\n")
    (root / "Ebay_test.txt").write_text("\n".join([rows[0], *rows[5:]]) + "\n")
    assert _make("sop", root, tmp_path / "out") == 0
    train = _rows(tmp_path / "out" / "train")
    assert [
        (r["class_id"], r["super_class_id"]) for r in sorted(train, key=lambda r: r["image_id"])
    ] == [(1, 1), (1, 1), (2, 1), (2, 1)]
    assert {r["label"] for r in train} == {0, 1}
    test = _rows(tmp_path / "out" / "test")
    assert [r["class_name"] for r in test] == ["11319", "11319"] and test[0]["label"] == 0
    (root / "Ebay_test.txt").write_text("id class path\n")
    with pytest.raises(
        LayoutError,
        match=r"Ebay_test.txt:1: header 'id class path'; expected 'image_id class_id super_class_id path'",
    ):
        list_split("sop", root, "test")
    (root / "Ebay_test.txt").write_text(rows[0] + "\n1 2 three a.jpg\n")
    with pytest.raises(LayoutError, match=r"Ebay_test.txt:2: '1 2 three a.jpg'; expected 4 fields"):
        list_split("sop", root, "test")


def _ijbc_layout(root: Path) -> None:
    meta = root / "IJBC" / "meta"
    meta.mkdir(parents=True)
    tid_mid = []
    for i in range(1, 9):
        write_image(root / "IJBC" / "loose_crop" / f"{i}.jpg", seed=i)
        template = 1 + (i - 1) // 2  # templates 1..4, two images each
        tid_mid.append(f"{i}.jpg {template} {100 + i // 3}")
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    # insightface's landmarks and detector scores: make-shards ijbc aligns by default
    five = [f"{i}.jpg {' '.join(map(str, face_landmarks(i)))} 0.9" for i in range(1, 9)]
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(five) + "\n")
    (meta / "ijbc_template_pair_label.txt").write_text("1 2 1\n1 3 0\n2 4 0\n")
    (meta / "ijbc_1N_gallery_G1.csv").write_text(
        "TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,7,img/1.jpg\n1,7,img/2.jpg\n3,9,img/5.jpg\n"
    )
    (meta / "ijbc_1N_probe_mixed.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n2,7\n")


def test_ijbc(tmp_path):
    _ijbc_layout(tmp_path / "ijb")
    assert _make("ijbc", tmp_path / "ijb", tmp_path / "out") == 0
    split = tmp_path / "out" / "test"
    rows = sorted(_rows(split), key=lambda r: r["source"])
    assert len(rows) == 8
    by_source = {r["source"]: r for r in rows}
    one = by_source["loose_crop/1.jpg"]
    assert (one["template_id"], one["media_id"], one["subject_id"]) == (1, 100, 7)
    assert by_source["loose_crop/8.jpg"]["subject_id"] == -1  # template 4: in no 1:N file
    assert by_source["loose_crop/8.jpg"]["class_name"] == "unknown"
    assert by_source["loose_crop/3.jpg"]["class_name"] == "subject7"  # template 2 -> probe 7
    pairs = pq.read_table(split / "pairs.parquet").to_pylist()
    assert pairs == [
        {"template1": 1, "template2": 2, "label": 1},
        {"template1": 1, "template2": 3, "label": 0},
        {"template1": 2, "template2": 4, "label": 0},
    ]
    g1 = pq.read_table(split / "gallery_G1.parquet").to_pylist()
    assert g1 == [{"template_id": 1, "subject_id": 7}, {"template_id": 3, "subject_id": 9}]
    assert not (split / "gallery_G2.parquet").exists()  # optional files stay optional
    assert {"template_id", "media_id", "subject_id"} <= set(_first_json(split))
    # every table IJB-C can write is one that a later --overwrite may remove
    tables = {f"{n}.parquet" for bench in IJB_GALLERIES for n in ijb_1n_files(bench)}
    assert {"pairs.parquet", *tables} == set(IJBC_TABLES)


def test_ijbc_errors(tmp_path):
    root = tmp_path / "ijb"
    _ijbc_layout(root)
    meta = root / "IJBC" / "meta"
    (meta / "ijbc_1N_probe_mixed.csv").write_text("TEMPLATE_ID,NAME\n2,x\n")
    with pytest.raises(
        LayoutError,
        match=r"ijbc_1N_probe_mixed.csv:1: header .*expected TEMPLATE_ID and SUBJECT_ID",
    ):
        list_split("ijbc", root, "test")
    (meta / "ijbc_1N_probe_mixed.csv").unlink()
    (meta / "ijbc_face_tid_mid.txt").write_text("1.jpg 1\n")
    with pytest.raises(
        LayoutError,
        match=r"ijbc_face_tid_mid.txt:1: '1.jpg 1'; expected image_name template_id media_id",
    ):
        list_split("ijbc", root, "test")
    (meta / "ijbc_template_pair_label.txt").unlink()
    with pytest.raises(
        LayoutError,
        match=r"ijbc_template_pair_label.txt does not exist; expected one `template1 template2 label` a line",
    ):
        list_split("ijbc", root, "test")
    with pytest.raises(LayoutError, match=r"meta is not a directory; expected IJBC/meta/"):
        list_split("ijbc", tmp_path, "test")


def test_imagefolder(tmp_path):
    root = tmp_path / "tree"
    write_image(root / "cat" / "a.jpg")
    write_image(root / "cat" / "deeper" / "b.png", seed=1)
    write_image(root / "dog" / "c.bmp", seed=2)
    (root / "dog" / "notes.txt").write_text("not an image")
    assert _make("imagefolder", root, tmp_path / "out", "--name", "pets") == 0
    rows = _rows(tmp_path / "out" / "train")
    assert sorted((r["class_name"], r["source"]) for r in rows) == [
        ("cat", "cat/a.jpg"),
        ("cat", "cat/deeper/b.png"),
        ("dog", "dog/c.bmp"),
    ]
    assert (tmp_path / "out" / "train" / "pets-train-000000.tar").is_file()
    write_image(root / "stray.jpg")
    with pytest.raises(
        LayoutError,
        match=r"holds images directly \(stray.jpg, ...\); expected <root>/<class>/<image>",
    ):
        list_split("imagefolder", root, "train")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(LayoutError, match=r"has no images in class folders"):
        list_split("imagefolder", tmp_path / "empty", "train")
    with pytest.raises(
        LayoutError, match=r"nowhere is not a directory; expected the sop dataset's root"
    ):
        list_split("sop", tmp_path / "nowhere", "train")


def test_synthetic_cli_writes_disjoint_train_and_test(tmp_path, capsys):
    code = main(
        [
            "make-shards",
            "synthetic",
            "--out",
            str(tmp_path),
            "--classes",
            "6",
            "--test-classes",
            "3",
            "--images-per-class",
            "4",
            "--image-size",
            "24",
            "--samples-per-shard",
            "8",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "24 samples, 6 classes, 3 shards" in out and "12 samples, 3 classes" in out
    train, test = _rows(tmp_path / "train"), _rows(tmp_path / "test")
    assert not {r["class_name"] for r in train} & {r["class_name"] for r in test}
    assert (train[0]["width"], train[0]["height"]) == (24, 24)
    assert main(["make-shards", "sop", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "make-shards sop needs --root DIR" in capsys.readouterr().err
