"""Shard writing never destroys input: no output overlapping the input, an existing
split only replaced with --overwrite and only the files make-shards wrote, an interrupted or
failed write leaves the old split, bad arguments and unwritable outputs refused up front."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data import writer
from pipeline.data.converters import list_split
from pipeline.data.validate import validate_split
from pipeline.data.writer import ShardWriteError, write_split
from tests.data_helpers import tiny_split
from tests.data_helpers.layouts import LAYOUTS, imagefolder, snapshot

REPO = Path(__file__).resolve().parents[1]


def _make(fmt: str, *args: str) -> int:
    """make-shards with one worker and no progress bar, unless ``args`` say otherwise."""
    return main(["make-shards", fmt, "--workers", "1", "--no-progress", *args])


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _synthetic(out: Path, *extra: str) -> int:
    return _make(
        "synthetic",
        "--out",
        str(out),
        "--classes",
        "4",
        "--test-classes",
        "2",
        "--images-per-class",
        "3",
        "--image-size",
        "16",
        "--samples-per-shard",
        "6",
        *extra,
    )


# ------------------------------------------------------------------ output overlapping the input


def test_imagefolder_root_is_the_split_it_would_write(tmp_path, capsys):
    """The reported case: --root D/train --out D would write D/train, the images themselves."""
    data = tmp_path / "D"
    imagefolder(data / "train")
    before = snapshot(data)
    assert _make("imagefolder", "--root", str(data / "train"), "--out", str(data)) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"output folder {data} overlaps the input {data / 'train'}" in line
    assert "choose an --out outside the input" in line
    assert snapshot(data) == before
    assert sorted(p.name for p in data.iterdir()) == ["train"]  # nothing written beside it


def _overlapping_outs(root: Path, tmp_path: Path) -> dict[str, Path]:
    link = tmp_path / "link_to_root"
    link.symlink_to(root, target_is_directory=True)
    return {
        "same": root,
        "inside": root / "shards",
        "around": root.parent,
        "link": link,  # overlaps only after resolving the link
        "inside_link": link / "shards",
    }


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_every_converter_refuses_an_output_overlapping_its_root(fmt, tmp_path, capsys):
    root = tmp_path / "data" / fmt
    LAYOUTS[fmt](root)
    before = snapshot(tmp_path / "data")
    for case, out in _overlapping_outs(root, tmp_path).items():
        assert _make(fmt, "--root", str(root), "--out", str(out)) == 2, case
        line = _one_line(capsys.readouterr().err)
        assert f"output folder {out} overlaps the input {root}" in line, case
        assert snapshot(tmp_path / "data") == before, case
        assert not (root / "shards").exists(), case
    # the same dataset written beside its root works, and again over itself with --overwrite
    # (IJB-C's tables included: they are among the files make-shards owns)
    assert _make(fmt, "--root", str(root), "--out", str(tmp_path / "shards")) == 0
    assert _make(fmt, "--root", str(root), "--out", str(tmp_path / "shards"), "--overwrite") == 0
    assert snapshot(tmp_path / "data") == before


def test_library_refuses_overlap_with_the_inputs_it_is_given(tmp_path):
    imagefolder(tmp_path / "D" / "train")
    items, _ = list_split("imagefolder", tmp_path / "D" / "train", "train")
    with pytest.raises(ShardWriteError, match="overlaps the input"):
        write_split(
            items, tmp_path / "D", name="t", split="train", inputs=[tmp_path / "D" / "train"]
        )
    assert len(list((tmp_path / "D" / "train").rglob("*.jpg"))) == 4


# ------------------------------------------------------------------ existing splits


def test_existing_split_is_refused_without_overwrite(tmp_path, capsys):
    assert _synthetic(tmp_path) == 0
    before = snapshot(tmp_path)
    assert _synthetic(tmp_path, "--seed", "3") == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{tmp_path / 'train'} already exists; pass --overwrite to replace it" in line
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_the_split_and_removes_only_its_old_files(tmp_path, capsys):
    assert _synthetic(tmp_path, "--samples-per-shard", "3") == 0  # 4 train shards
    (tmp_path / "notes.txt").write_text("mine")  # beside the splits: never touched
    assert len(list((tmp_path / "train").glob("*.tar"))) == 4
    assert _synthetic(tmp_path, "--overwrite", "--samples-per-shard", "12") == 0
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "index.parquet",
        "sizes.json",
        "skipped.txt",
        "synthetic-train-000000.tar",  # the 3 old shards that no longer exist are gone
    ]
    assert validate_split(tmp_path / "train")[1] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "test", "train"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "intruder", ["notes.txt", "sub/model.pt", "other-test-000000.tar", "link.tar"]
)
def test_overwrite_refuses_a_split_folder_holding_a_file_it_did_not_write(
    intruder, tmp_path, capsys
):
    assert _synthetic(tmp_path) == 0
    path = tmp_path / "train" / intruder
    path.parent.mkdir(parents=True, exist_ok=True)
    if intruder == "link.tar":
        path.symlink_to(tmp_path / "test" / "index.parquet")
    else:
        path.write_text("a user's file")
    before = snapshot(tmp_path)
    assert _synthetic(tmp_path, "--overwrite") == 2
    line = _one_line(capsys.readouterr().err)
    name = intruder.split("/")[0]
    assert f"{tmp_path / 'train' / name} was not written by make-shards" in line
    assert "--overwrite only removes shards <name>-train-NNNNNN.tar and index.parquet" in line
    assert snapshot(tmp_path) == before  # test split not written either: refused up front


def test_a_user_folder_named_like_the_old_partial_folder_is_kept(tmp_path):
    keep = tmp_path / "train.partial"
    keep.mkdir(parents=True)
    (keep / "work.txt").write_text("mine")
    tiny_split(tmp_path, classes=2, per_class=2)
    assert (keep / "work.txt").read_text() == "mine"


def test_split_path_that_is_a_file_is_refused(tmp_path, capsys):
    tmp_path.joinpath("train").write_text("a file")
    assert _synthetic(tmp_path) == 2
    assert "train is a file, not a split folder" in _one_line(capsys.readouterr().err)
    assert tmp_path.joinpath("train").read_text() == "a file"


def _old_split(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    split = tiny_split(tmp_path, classes=3, per_class=4, samples_per_shard=4)
    return split, snapshot(split)


def _new_items():
    from pipeline.data.synthetic import synthetic_items

    return synthetic_items(
        split="train", num_classes=4, images_per_class=3, image_size=16, seed=9, quality=90
    )


def test_interrupted_overwrite_leaves_the_old_split_and_no_debris(tmp_path, monkeypatch):
    split, before = _old_split(tmp_path)
    calls = []
    prepare = writer._prepare

    def interrupted(item, resize, quality):
        calls.append(item)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the shards
        return prepare(item, resize, quality)

    monkeypatch.setattr(writer, "_prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_split(
            _new_items(), tmp_path, name="synthetic", split="train", overwrite=True, progress=False
        )
    assert snapshot(split) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_split_failing_validation_is_not_swapped_in(tmp_path, monkeypatch):
    split, before = _old_split(tmp_path)
    prepare = writer._prepare

    def wrong_width(item, resize, quality):
        status, payload = prepare(item, resize, quality)
        data, width, height = payload
        return status, (data, width + 1, height)  # the index would disagree with the image

    monkeypatch.setattr(writer, "_prepare", wrong_width)
    with pytest.raises(ShardWriteError, match=r"fails validation .*width x height.*kept in"):
        write_split(
            _new_items(), tmp_path, name="synthetic", split="train", overwrite=True, progress=False
        )
    assert snapshot(split) == before
    (partial,) = tmp_path.glob("train.partial-*")  # kept for inspection, as the message says
    assert (partial / "index.parquet").is_file()


def test_too_many_unreadable_images_leave_the_old_split(tmp_path):
    split, before = _old_split(tmp_path)
    items = _new_items()
    for item in items[:3]:
        item.render = ()
        item.path = str(tmp_path / "garbage.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"garbage")
    with pytest.raises(ShardWriteError, match=r"3 of 12 images .* above the limit"):
        write_split(items, tmp_path, name="synthetic", split="train", overwrite=True)
    assert snapshot(split) == before


# ------------------------------------------------------------------ arguments


BAD_ARGUMENTS = [
    (["--resize", "0"], "--resize 0: the shorter side must be a positive number of pixels"),
    (["--resize", "-5"], "--resize -5: the shorter side must be a positive number of pixels"),
    (["--workers", "0"], "--workers 0: must be a whole number >= 1"),
    (["--workers", "-2"], "--workers -2: must be a whole number >= 1"),
    (["--samples-per-shard", "0"], "--samples-per-shard 0: must be a whole number >= 1"),
    (["--quality", "0"], "--quality 0: JPEG quality must be in 1..100"),
    (["--quality", "101"], "--quality 101: JPEG quality must be in 1..100"),
    (["--max-skipped-fraction", "1.5"], "--max-skipped-fraction 1.5: a fraction of a split"),
    (["--max-skipped-fraction", "-0.1"], "--max-skipped-fraction -0.1: a fraction of a split"),
    (["--max-skipped-fraction", "nan"], "--max-skipped-fraction nan: a fraction of a split"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--classes", "0"], "--classes 0: must be a whole number >= 1"),
    (["--image-size", "0"], "--image-size 0: must be a whole number >= 1"),
    (["--name", "my.set"], "--name 'my.set': use letters, digits and '_' only"),
    (["--split", "train,val-1"], "--split 'val-1': use letters, digits and '_' only"),
    (["--split", "train,train"], "--split train,train: names a split twice"),
    (["--split", ","], "--split ',': names no split"),
]


@pytest.mark.parametrize(
    ("args", "message"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_are_one_line_errors_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert _synthetic(out, *args) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("pipeline make-shards: error: ") and message in line, line
    assert not out.exists()


def test_missing_or_wrong_root_is_refused_before_any_work(tmp_path, capsys):
    assert _make("sop", "--out", str(tmp_path / "o")) == 2
    assert "make-shards sop needs --root DIR" in _one_line(capsys.readouterr().err)
    assert _make("sop", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--root {tmp_path / 'nowhere'} is not a directory" in line
    assert not (tmp_path / "o").exists()


def test_a_malformed_list_of_a_later_split_stops_before_any_split_is_written(tmp_path, capsys):
    root = tmp_path / "inat"
    LAYOUTS["inaturalist"](root)
    (root / "Inaturalist_test_set1.txt").write_text(
        "train_val2018/Aves/3/0.jpg\ntrain_val2018/Plantae/x.jpg\n"
    )
    assert _make("inaturalist", "--root", str(root), "--out", str(tmp_path / "o")) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{root / 'Inaturalist_test_set1.txt'}:2: 'train_val2018/Plantae/x.jpg'" in line
    assert "train_val2018/<supercategory>/<category>/<file>.jpg (3 path levels" in line
    assert not (tmp_path / "o").exists()  # the good train split was not written either


# ------------------------------------------------------------------ unwritable output


def _can_mount_privately() -> bool:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_privately(), reason="needs unshare -m and mount (root)")
def test_read_only_output_is_a_one_line_error_naming_it(tmp_path):
    """A real read-only file system (a read-only bind mount in a private mount namespace, so
    nothing outside this test sees it); root cannot write there either."""
    backing, ro = tmp_path / "backing", tmp_path / "ro"
    backing.mkdir()
    ro.mkdir()
    script = (
        f"mount --bind {backing} {ro} && mount -o remount,bind,ro {ro} && "
        f'exec "{sys.executable}" -m pipeline.cli make-shards synthetic --out {ro / "out"} '
        "--classes 2 --test-classes 1 --images-per-class 2 --image-size 8 --no-progress"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert result.returncode == 2, result.stderr
    line = _one_line(result.stderr)
    assert line == (
        f"pipeline make-shards: error: output folder {ro} is not writable (to create "
        f"{ro / 'out'}): a read-only file system or no permission; choose a writable --out"
    )
    assert list(backing.iterdir()) == []


def test_output_that_cannot_be_created_is_a_one_line_error_naming_it(capsys):
    """Under /proc nothing can be created, even by root (for whom os.access says yes): the
    failure comes at the first write and is reported there, as one line."""
    out = Path("/proc/shardsafe_no_such_dir/out")
    code = _synthetic(out)
    line = _one_line(capsys.readouterr().err)
    assert code in (1, 2)  # 2 where os.access already refuses (not root)
    assert "/proc" in line and ("cannot write" in line or "not writable" in line)
    assert not out.parent.exists()
