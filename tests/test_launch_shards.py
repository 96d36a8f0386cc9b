"""launch/shards.py without a cluster: what is refused before anything is submitted, and the
commands it prints. The array on a real Slurm is tests/test_slurm_shards.py."""

from __future__ import annotations

import pytest

from launch import shards
from launch.cluster import LaunchError


def refused(argv: list[str], capsys) -> str:
    assert shards.main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith("nothing was submitted\n")
    return err.splitlines()[0]


def test_refusals_before_submission(tmp_path, capsys):
    out = ["synthetic", "--out", str(tmp_path / "o"), "--split", "train", "--classes", "4"]
    line = refused(["--cluster", "localslurm", *out], capsys)
    assert line.startswith("error: give the make-shards command after --")
    line = refused(["--", *out, "--tasks", "2", "--task", "1"], capsys)
    assert line.startswith("error: --task in the make-shards arguments: the launcher adds")
    line = refused(["--", *out], capsys)
    assert "need --tasks N" in line
    line = refused(["--", *out, "--tasks", "2", "--quality", "0"], capsys)  # make-shards' rule
    assert line == "error: --quality 0: JPEG quality must be in 1..100, e.g. 90"
    line = refused(["--", *out, "--tasks", "5"], capsys)  # the listing is checked too
    assert "split 'train': --tasks 5: the split has only 4 classes" in line
    line = refused(["--only", "2", "--", *out, "--tasks", "2"], capsys)
    assert line == "error: --only 2: give part numbers in 0..1, e.g. --only 2,5"
    line = refused(["--", *out, "--tasks", "2", "--bogus"], capsys)
    assert "make-shards arguments" in line and "--bogus" in line
    assert not (tmp_path / "o").exists()


def test_only_parses_and_rerun_drops_it():
    assert shards.parse_only(None, 3) == [0, 1, 2]
    assert shards.parse_only("2,0,2", 3) == [0, 2]
    with pytest.raises(LaunchError, match=r"--only x: give part numbers in 0\.\.2"):
        shards.parse_only("x", 3)
    argv = ["--cluster", "c", "--only", "1,2", "--time", "9", "--only=3"]
    assert shards.without_only(argv) == ["--cluster", "c", "--time", "9"]


def test_workers_default_to_the_cpus_of_a_task(tmp_path, capsys):
    base = [
        "synthetic",
        "--out",
        str(tmp_path),
        "--split",
        "train",
        "--classes",
        "3",
        "--tasks",
        "3",
    ]
    argv, args = shards.check_shard_args(base, cpus_per_task=6)
    assert argv[-2:] == ["--workers", "6"] and args.workers == 6
    argv, args = shards.check_shard_args([*base, "--workers", "2"], cpus_per_task=6)
    assert argv.count("--workers") == 1 and args.workers == 2
    assert "split 'train': 3 classes in 3 parts" in capsys.readouterr().out
