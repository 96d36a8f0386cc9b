"""make-shards over many tasks (pipeline.data.parts): the class split, part records, the merge
and its refusals, against a single-task conversion of the same items written by the same code.

The Slurm array itself (launch/shards.py) is tested in tests/test_slurm_shards.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data import part_records, parts
from pipeline.data.catalog import read_index
from pipeline.data.items import SourceItem
from pipeline.data.make_shards import add_arguments
from pipeline.data.writer import class_order, write_split
from tests.data_helpers import write_image

SEED = 3
OPTIONS = dict(samples_per_shard=4, resize=0, quality=90, workers=1, progress=False)
SETTINGS = {"format": "imagefolder", "name": "toy", "quality": 90, "resize": None, "seed": SEED}


def brute_force_min_max(counts: list[int], tasks: int) -> int:
    """The smallest largest-part total over every cut of ``counts`` into ``tasks`` non-empty
    contiguous runs (all cut positions tried)."""
    best = None
    for cuts in itertools.combinations(range(1, len(counts)), tasks - 1):
        bounds = [0, *cuts, len(counts)]
        worst = max(sum(counts[a:b]) for a, b in itertools.pairwise(bounds))
        best = worst if best is None else min(best, worst)
    return best


def test_plan_is_contiguous_complete_and_as_balanced_as_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = [int(c) for c in rng.integers(1, 20, size=int(rng.integers(1, 9)))]
        tasks = int(rng.integers(1, len(counts) + 1))
        plan = part_records.plan_parts(counts, tasks)
        assert len(plan) == tasks and all(len(r) >= 1 for r in plan)
        assert [i for r in plan for i in r] == list(range(len(counts)))  # contiguous, in order
        largest = max(sum(counts[i] for i in r) for r in plan)
        assert largest == brute_force_min_max(counts, tasks), (counts, tasks, plan)
        assert part_records.plan_parts(counts, tasks) == plan  # deterministic


def test_more_tasks_than_classes_is_refused():
    with pytest.raises(
        part_records.PartsError, match=r"--tasks 4: the split has only 3 classes.*3 or fewer"
    ):
        part_records.plan_parts([5, 1, 2], 4)


@pytest.fixture
def listing(tmp_path) -> list[SourceItem]:
    """7 classes of 2..4 images on disk; one image of class c4 is corrupt (a skipped sample)."""
    items = []
    for c in range(7):
        for i in range(2 + c % 3):
            path = write_image(tmp_path / "src" / f"c{c}" / f"{i}.jpg", 12 + i, 10 + c, 7 * c + i)
            items.append(SourceItem(f"c{c}", f"c{c}/{i}.jpg", str(path)))
    bad = Path(next(item.path for item in items if item.source == "c4/0.jpg"))
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG: the writer skips it
    return items


def write_parts(items, out, tasks, which=None, settings=SETTINGS, **options):
    for task in range(tasks) if which is None else which:
        parts.write_part(
            items,
            out,
            name="toy",
            split="train",
            task=task,
            tasks=tasks,
            seed=SEED,
            settings=settings,
            **{**OPTIONS, "max_skipped_fraction": 0.5, **options},
        )


def merge(items, out, tasks, settings=SETTINGS):
    return parts.merge_parts(
        items,
        out,
        name="toy",
        split="train",
        tasks=tasks,
        seed=SEED,
        settings=settings,
        max_skipped_fraction=0.5,
        **OPTIONS,
    )


def samples(split_dir: Path) -> list[tuple[str, str, bytes]]:
    """(class name, source, image bytes) of every sample, read back with tarfile."""
    rows = read_index(split_dir).to_pylist()
    out = []
    for shard in dict.fromkeys(r["shard"] for r in rows):
        with tarfile.open(split_dir / shard) as tar:
            for info in tar:
                if info.name.endswith(".jpg"):
                    key = info.name.split(".")[0]
                    row = next(r for r in rows if r["key"] == key)
                    out.append((row["class_name"], row["source"], tar.extractfile(info).read()))
    return out


def test_parts_cover_the_class_order_and_merge_equals_one_task(listing, tmp_path):
    ordered, _ = class_order(listing, SEED)
    runs = part_records.class_runs(listing, SEED)
    assert [i for run in runs for i in run] == ordered

    write_split(listing, tmp_path / "one", name="toy", split="train", seed=SEED,
                max_skipped_fraction=0.5, **OPTIONS)  # fmt: skip
    write_parts(listing, tmp_path / "many", 3)
    records = [
        json.loads(
            (part_records.part_dir(tmp_path / "many", "train", t, 3) / "part.json").read_text()
        )
        for t in range(3)
    ]
    # Each record: its settings, classes with their listed counts, shards with sizes, skips.
    plan = part_records.plan_parts([len(r) for r in runs], 3)
    for record, span in zip(records, plan):
        assert record["settings"] == SETTINGS
        assert record["classes"] == [
            [r[0].class_name, len(r)] for r in runs[span.start : span.stop]
        ]
        folder = part_records.part_dir(tmp_path / "many", "train", record["task"], 3) / "train"
        for shard, info in record["shards"].items():
            assert info["bytes"] == (folder / shard).stat().st_size
    assert sum(r["written"] for r in records) == len(listing) - 1
    [skip] = [s for r in records for s in r["skipped"]]
    assert skip[1] == "c4/0.jpg" and "Error" in skip[2]

    summary = merge(listing, tmp_path / "many", 3)
    assert (summary.samples, summary.skipped) == (len(listing) - 1, 1)
    one, many = tmp_path / "one" / "train", tmp_path / "many" / "train"
    assert samples(many) == samples(one)  # same (class, source) rows, same image bytes
    names = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in many.iterdir()) == names
    for name in names:  # and in fact the very same split, shard boundaries included
        assert (many / name).read_bytes() == (one / name).read_bytes(), name
    assert not part_records.parts_dir(tmp_path / "many", "train").exists()  # the parts are removed


def test_merge_names_each_missing_or_other_part_and_writes_nothing(listing, tmp_path):
    out = tmp_path / "out"
    write_parts(listing, out, 4, which=[0, 2])
    write_parts(listing, out, 4, which=[3], settings={**SETTINGS, "quality": 80})
    with pytest.raises(part_records.PartsError) as err:
        merge(listing, out, 4)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("2 of 4 parts of split 'train'") and "--task I" in lines[0]
    assert len(lines) == 3
    assert lines[1].startswith("  part 1 (class") and "missing: no " in lines[1]
    assert "part-1-of-4/part.json" in lines[1]
    assert lines[2].startswith("  part 3 (") and "--quality 80 there, 90 here" in lines[2]
    assert not (out / "train").exists()

    # Re-running the failed parts alone, then the merge, completes the split.
    write_parts(listing, out, 4, which=[1, 3])
    assert merge(listing, out, 4).samples == len(listing) - 1


def test_damaged_parts_are_refused(listing, tmp_path):
    out = tmp_path / "out"
    write_parts(listing, out, 3)
    folder = [part_records.part_dir(out, "train", t, 3) for t in range(3)]
    shard = sorted((folder[1] / "train").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-512])  # truncated
    (folder[2] / "part.json").write_text('{"version": 1, ')  # a record cut short
    with pytest.raises(part_records.PartsError) as err:
        merge(listing, out, 3)
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert "part 1 (" in lines[1] and f"damaged: {shard} is " in lines[1]
    assert "its record says" in lines[1]
    assert "part 2 (" in lines[2] and "does not parse as a part record" in lines[2]

    # The same size but other bytes: found by the checksum while the part is read, and the
    # merge publishes nothing.
    write_parts(listing, out, 3, which=[1, 2])
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(
        part_records.PartsError, match=r"part 1: .* changed since the part was written"
    ):
        merge(listing, out, 3)
    assert not (out / "train").exists()
    assert not list(out.glob("train.partial-*"))


def test_a_changed_listing_is_refused(listing, tmp_path):
    write_parts(listing, tmp_path, 2)
    renamed = [*listing[:-1], SourceItem(listing[-1].class_name, "elsewhere.jpg", listing[-1].path)]
    with pytest.raises(part_records.PartsError, match=r"another listing of the dataset"):
        merge(renamed, tmp_path, 2)


def test_rerun_replaces_a_killed_attempt_and_merge_keeps_foreign_files(listing, tmp_path):
    write_parts(listing, tmp_path, 2)
    folder = part_records.part_dir(tmp_path, "train", 0, 2)
    # What a task killed mid-write leaves: a partial folder and no record.
    (folder / "part.json").unlink()
    stale = folder / "train.partial-abc123"
    stale.mkdir()
    (stale / "toy-train-000000.tar").write_bytes(b"half")
    write_parts(listing, tmp_path, 2, which=[0])
    assert not stale.exists()
    (folder / "notes.txt").write_text("mine")
    merge(listing, tmp_path, 2)
    assert (folder / "notes.txt").read_text() == "mine"  # never deleted; the rest is gone
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def flags(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["synthetic", "--out", "x", *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "0"], r"--tasks 0: give the number of parts"),
        (["--merge"], r"--tasks 0: give the number of parts"),
        (["--tasks", "-1"], r"--tasks -1"),
        (["--tasks", "3", "--task", "3"], r"--task 3: parts are numbered 0..2"),
        (["--tasks", "3", "--task", "1", "--merge"], r"either converts one part or merges"),
        (["--tasks", "2", "--task", "0", "--out", "s3://b/x"], r"--out s3://b/x: array parts"),
    ],
)
def test_task_flags_are_checked(argv, message):
    with pytest.raises(parts.TaskFlagError, match=message):
        parts.check_flags(flags(*argv))


def test_settings_are_the_arguments_that_change_the_output():
    a = part_records.settings_of(
        flags("--tasks", "3", "--task", "1", "--workers", "8", "--quality", "80")
    )
    b = part_records.settings_of(
        flags("--tasks", "3", "--merge", "--no-progress", "--quality", "80")
    )
    assert a == b and a["quality"] == 80 and a["format"] == "synthetic"
    assert not {"workers", "task", "merge", "out", "tasks"} & set(a)


def test_cli_plan_parts_merge_and_refusal(tmp_path, capsys):
    base = ["make-shards", "synthetic", "--classes", "5", "--images-per-class", "2"]
    base += ["--image-size", "16", "--split", "train", "--no-progress", "--workers", "1"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    many = [*base, "--out", str(tmp_path / "many"), "--tasks", "2"]
    assert main(many) == 0  # the plan alone writes nothing
    plan = capsys.readouterr().out
    assert "split 'train': 5 classes in 2 parts" in plan and "  part 1: classes 3..4" in plan
    assert not (tmp_path / "many").exists()
    assert main([*many, "--task", "1"]) == 0
    assert main([*many, "--merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipeline make-shards: error: 1 of 2 parts of split 'train'")
    assert "\n  part 0 (classes 0..2 " in err and "missing" in err
    assert main([*many, "--task", "0", "--workers", "2"]) == 0  # workers: not a setting
    assert main([*many, "--merge"]) == 0
    one, merged = tmp_path / "one" / "train", tmp_path / "many" / "train"
    for path in sorted(one.iterdir()):
        assert (merged / path.name).read_bytes() == path.read_bytes(), path.name
    assert main([*many, "--merge"]) == 2  # the split exists now: --overwrite, as for one task
    assert "already exists; pass --overwrite" in capsys.readouterr().err
