"""Real Slurm: make-shards as a job array of parts plus a merge job (launch/shards.py), on the
one-node cluster of tests/slurm/start_local_slurm.sh.

The reference is a single-task conversion of the same files by the same command; the merged
split must hold the same (class, source image) rows and the same image bytes (and, since the
merge writes the split as one task would, the same files byte for byte).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from launch import shards
from pipeline.cli import main as pipeline_main
from pipeline.data import part_records
from pipeline.data.catalog import read_index
from pipeline.data.converters import list_split
from tests.data_helpers import write_image
from tests.slurm.local_cluster import job_state
from tests.test_slurm import slurm_cluster  # noqa: F401  (the session's cluster)

pytestmark = pytest.mark.slurm

TASKS = 3
IDENTITIES = 6


@pytest.fixture
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(VGGFace2-layout root, its single-task conversion's train split)."""
    root = tmp_path_factory.mktemp("vggface2")
    lines = []
    for n in range(IDENTITIES):
        for i in range(1 + n % 3):
            rel = f"n{n:06d}/{i:04d}_01.jpg"
            write_image(root / "train" / rel, 20 + i, 16 + n, seed=10 * n + i)
            lines.append(rel)
    (root / "train_list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("one")
    assert pipeline_main(["make-shards", *shard_args(root, out)]) == 0
    return root, out / "train"


def shard_args(root: Path, out: Path) -> list[str]:
    return ["vggface2", "--root", str(root), "--out", str(out), "--split", "train", "--no-progress"]


def array_argv(tmp_path: Path, root: Path, *launcher: str) -> list[str]:
    return [
        *("--cluster", "localslurm", "--folder", f"{tmp_path}/jobs/%j", *launcher),
        *("--", *shard_args(root, tmp_path / "out"), "--tasks", str(TASKS)),
    ]


def rows_and_images(split_dir: Path) -> list[tuple[str, str, bytes]]:
    """(class name, source, image bytes) of every sample, in index order, read with tarfile."""
    images = {}
    for shard in split_dir.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.name.endswith(".jpg"):
                    images[(shard.name, info.name[:-4])] = tar.extractfile(info).read()
    return [
        (r["class_name"], r["source"], images[(r["shard"], r["key"])])
        for r in read_index(split_dir).to_pylist()
    ]


def assert_same_split(merged: Path, reference: Path) -> None:
    assert rows_and_images(merged) == rows_and_images(reference)
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in merged.iterdir()) == names
    for name in names:
        assert (merged / name).read_bytes() == (reference / name).read_bytes(), name


def test_array_of_three_with_a_cancelled_part_rerun_alone_then_merged_equals_one_task(
    slurm_cluster,  # noqa: F811
    dataset,
    tmp_path,
    capsys,
):
    # One scenario for both promises (an array of 3 plus the merge gives the single-task split;
    # a killed part re-run alone, then the merge, completes it): a task costs seconds here
    # (python, torch through webdataset), and the node runs two at a time.
    source, reference = dataset
    root = tmp_path / "vggface2"
    shutil.copytree(source, root)
    # The first image of part 1 becomes a named pipe: reading it blocks until the task is
    # cancelled (a task hung on a stuck file system), so the cancel always finds it running.
    items, _ = list_split("vggface2", root, "train")
    runs = part_records.class_runs(items, seed=0)
    stuck = Path(runs[part_records.plan_parts([len(r) for r in runs], TASKS)[1].start][0].path)
    image = stuck.read_bytes()
    stuck.unlink()
    os.mkfifo(stuck)

    sub = shards.submit(array_argv(tmp_path, root))
    array = str(sub.jobs[0].job_id).split("_")[0]
    assert [str(j.job_id) for j in sub.jobs[:-1]] == [f"{array}_{i}" for i in range(TASKS)]
    text = shards.describe(sub)
    assert f"submitted make-shards array job {array}: parts all of {TASKS}" in text
    assert "--only I -- vggface2 --root" in text and "--task I && pipeline make-shards" in text
    part1 = str(sub.jobs[1].job_id)
    deadline = time.monotonic() + 60
    while job_state(part1) != "RUNNING":
        assert time.monotonic() < deadline, f"part 1 ({part1}) never ran"
        time.sleep(0.3)
    subprocess.run(["scancel", part1], check=True)
    # The merge runs once every part has ended (afterany), refuses, and names part 1; --wait's
    # report prints the command that re-runs it.
    assert not shards.wait(sub, poll_s=0.3)
    report = capsys.readouterr().out
    assert (
        f"part 1: CANCELLED; re-run it, then the merge: {sys.executable} -m launch.shards" in report
    )
    assert (
        "--only 1 -- vggface2 --root" in report
        and f"merge job {sub.merge.job_id}: FAILED" in report
    )
    states = [job_state(str(j.job_id)) for j in sub.jobs[:-1]]
    assert states == ["COMPLETED", "CANCELLED", "COMPLETED"]
    log = Path(sub.merge.paths.stderr).read_text()
    assert "1 of 3 parts of split 'train'" in log and "--task I instead of --merge" in log
    assert "\n  part 1 (" in log and "missing: no " in log
    assert "part 0 (" not in log and "part 2 (" not in log
    assert not (tmp_path / "out" / "train").exists()

    stuck.unlink()
    stuck.write_bytes(image)  # the file system is back
    rerun = shards.submit(array_argv(tmp_path, root, "--only", "1"))
    assert len(rerun.jobs) == 2 and rerun.parts == [1]  # part 1 alone, then a merge
    assert shards.wait(rerun, poll_s=0.3), rerun.merge.stderr()
    assert_same_split(tmp_path / "out" / "train", reference)
    assert not part_records.parts_dir(tmp_path / "out", "train").exists()
