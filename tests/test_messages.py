"""Bad input named in one line: a damaged weights file, a wrong launcher
flag, GPUs asked of a machine without them, and no literal ``%j`` folder from local runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch import cluster as cluster_mod
from launch import slurm
from launch.cluster import LaunchError
from pipeline.model import load_trained_model
from pipeline.weights import ModelLoadError, read_state_dict

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "conf" / "demo.yaml"


@pytest.mark.parametrize("content", [b"\x00" * 3, b"\xff" * 300, b"{not json at all}" * 10])
def test_garbage_safetensors_names_the_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(
        ModelLoadError,
        match=r"^cannot read '.*model\.safetensors' as a \.safetensors file \(SafetensorError: "
        r".*\); the file is damaged or not a safetensors file: re-copy it",
    ) as info:
        read_state_dict(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors' as a \.safetensors file"):
        load_trained_model(path)


def launcher(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.slurm", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_negative_parts_names_the_flag_and_the_rule(tmp_path):
    proc = launcher("evaluate", "--config", str(DEMO), "checkpoint=x", "--parts", "-3")
    assert proc.returncode == 2
    assert (
        "error: argument --parts: '-3': must be an integer >= 1 (extraction array tasks; "
        "leave --parts out for one job)" in proc.stderr
    )
    with pytest.raises(LaunchError, match=r"^--parts -3: the number of extraction array tasks"):
        slurm.submit("evaluate", DEMO, ["checkpoint=x"], local=True, parts=-3)


@pytest.mark.parametrize(
    ("flag", "value", "rule"),
    [("--nodes", "0", ">= 1"), ("--gpus-per-node", "-1", ">= 0"), ("--time", "soon", ">= 1")],
)
def test_launcher_count_flags_name_flag_and_rule(flag, value, rule):
    with pytest.raises(SystemExit):
        slurm.build_parser().parse_intermixed_args(["train", "--config", "x.yaml", flag, value])
    proc = launcher("train", "--config", str(DEMO), flag, value)
    assert proc.returncode == 2
    assert f"argument {flag}: '{value}': must be an integer {rule}" in proc.stderr


def test_local_gpus_on_a_machine_without_gpus(monkeypatch, tmp_path):
    monkeypatch.setattr(cluster_mod, "local_gpu_count", lambda: 0)
    flags = {"gpus_per_node": 2, "folder": str(tmp_path / "%j")}
    with pytest.raises(
        LaunchError,
        match=r"^--gpus-per-node 2 \(launch\.gpus_per_node\) with --local: this machine has no "
        r"GPU .*pass --gpus-per-node 0 --tasks-per-node N to run N CPU processes",
    ):
        slurm.prepare("train", DEMO, flags=flags, local=True)
    monkeypatch.setattr(cluster_mod, "local_gpu_count", lambda: 1)
    with pytest.raises(LaunchError, match=r"this machine has only 1 GPU\(s\).*--gpus-per-node 1"):
        slurm.prepare("train", DEMO, flags=flags, local=True)
    assert not (tmp_path / "%j").exists()


def test_local_gpus_refused_by_the_cli_on_this_machine(tmp_path):
    if cluster_mod.local_gpu_count() >= 2:
        pytest.skip("this machine has 2 GPUs")
    proc = launcher(
        "train", "--config", str(DEMO), "--local", "--gpus-per-node", "2",
        "--folder", f"{tmp_path}/jobs/%j",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error: --gpus-per-node 2 (launch.gpus_per_node) with --local: this machine" in (
        proc.stderr
    )
    assert "nothing was submitted" in proc.stderr
    assert not (tmp_path / "jobs").exists()


def test_local_launch_leaves_no_literal_job_id_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = slurm.prepare(
        "train",
        DEMO,
        flags={"gpus_per_node": 0, "tasks_per_node": 1, "folder": "jobs/%j/logs"},
        local=True,
    )
    assert "%" not in cfg.launch.folder
    assert Path(cfg.launch.folder).parent.parent == tmp_path / "jobs"
    executor = slurm.make_executor(cfg.launch, local=True, name="t")
    job = executor.submit(sum, [1, 2])
    assert job.result() == 3
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == [
        Path(cfg.launch.folder).parent.name
    ]
    assert list(Path(cfg.launch.folder).glob(f"{job.job_id}_0_log.out"))
