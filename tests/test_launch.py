"""The launcher without a Slurm cluster: config layering, cluster files, the generated sbatch
script, refusals, and a real 2-task job through submitit's local executor."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from launch import cluster as cluster_mod
from launch import slurm
from launch.cluster import LaunchError, _gpu_count, cluster_overrides, tasks_per_node
from pipeline.config.schema import ConfigError
from pipeline.config.schema_services import LaunchConfig

REPO = Path(__file__).resolve().parent.parent


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_layers_config_then_cluster_then_overrides_then_flags(tmp_path):
    config = _write(tmp_path / "run.yaml", {"launch": {"nodes": 3, "qos": "low", "account": "a"}})
    site = _write(tmp_path / "site.yaml", {"qos": "high", "account": "b", "partition": "p"})
    cfg = slurm.resolve_config(
        config,
        ["launch.account=c", "optim.lr=0.5"],
        cluster=str(site),
        flags={"partition": "q", "time": 7, "nodes": None},
    )
    launch = cfg.launch
    assert launch.nodes == 3  # only the config file sets it (a None flag is "not given")
    assert launch.qos == "high"  # cluster file over config file
    assert launch.account == "c"  # key=value over cluster file
    assert (launch.partition, launch.time_minutes) == ("q", 7)  # flags over everything
    assert cfg.optim.lr == 0.5


def test_cluster_file_may_nest_under_launch_and_keeps_types(tmp_path):
    site = _write(
        tmp_path / "site.yaml",
        {"launch": {"setup": ["module load cuda", "export A='x y'"], "gpus_per_node": 4}},
    )
    overrides = cluster_overrides(str(site))
    cfg = slurm.resolve_config(REPO / "conf" / "defaults.yaml", cluster=str(site))
    assert cfg.launch.setup == ["module load cuda", "export A='x y'"]
    assert cfg.launch.gpus_per_node == 4
    assert len(overrides) == 2


def test_shipped_cluster_files_load():
    for path in sorted((REPO / "conf" / "cluster").glob("*.yaml")):
        cfg = slurm.resolve_config(REPO / "conf" / "defaults.yaml", cluster=path.stem)
        assert cfg.launch.partition, path


def test_unknown_cluster_key_names_file_and_valid_keys(tmp_path):
    site = _write(tmp_path / "site.yaml", {"gpus": 8})
    with pytest.raises(LaunchError, match=r"site\.yaml: unknown key\(s\) gpus; valid launch keys"):
        cluster_overrides(str(site))


def test_unknown_cluster_name_lists_known_ones():
    with pytest.raises(LaunchError, match=r"--cluster 'nowhere'.*known clusters: .*localslurm"):
        cluster_overrides("nowhere")


def test_missing_config_file_is_refused():
    with pytest.raises(ConfigError, match=r"config file 'no/such\.yaml' does not exist"):
        slurm.prepare("train", "no/such.yaml", local=True)


def test_bad_launch_value_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"launch\.signal_delay_s=120: .*shorter than the time"):
        slurm.resolve_config(REPO / "conf" / "defaults.yaml", flags={"time": 1})


def test_local_run_refuses_several_nodes():
    with pytest.raises(LaunchError, match=r"--nodes 2 with --local: a local run has 1 node"):
        slurm.prepare("train", REPO / "conf" / "defaults.yaml", flags={"nodes": 2}, local=True)


def test_tasks_per_node_defaults_to_gpus():
    assert tasks_per_node(LaunchConfig(gpus_per_node=8)) == 8
    assert tasks_per_node(LaunchConfig(gpus_per_node=0)) == 1
    assert tasks_per_node(LaunchConfig(gpus_per_node=4, tasks_per_node=2)) == 2


def test_gpu_count_from_sinfo_gres():
    assert _gpu_count("(null)") == 0
    assert _gpu_count("gpu:8") == 8
    assert _gpu_count("gpu:a100:4(S:0-1),shard:2") == 4
    assert _gpu_count("tmpfs:100,gpu:h100:8(S:0)") == 8


def test_no_slurm_client_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cluster_mod.shutil, "which", lambda name: None)
    with pytest.raises(LaunchError, match=r"sinfo not found.*--local"):
        cluster_mod.read_partitions()


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's Slurm executor needs srun")
def test_sbatch_script_carries_the_resources(tmp_path):
    site = _write(tmp_path / "site.yaml", {"setup": ["module load cuda/12"]})
    cfg = slurm.resolve_config(
        REPO / "conf" / "defaults.yaml",
        cluster=str(site),
        flags={
            "nodes": 2,
            "gpus_per_node": 4,
            "cpus_per_task": 6,
            "mem_gb": 100,
            "partition": "gpu",
            "time": 90,
            "account": "proj",
            "qos": "high",
            "constraint": "a100",
            "folder": str(tmp_path / "%j"),
        },
    )
    executor = slurm.make_executor(cfg.launch, local=False, name="smoothap-train")
    text = executor._executor._make_submission_file_text("CMD", "uid")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=100GB",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --job-name=smoothap-train",
        "module load cuda/12",
    ):
        assert line in text.splitlines(), (line, text)
    assert f"--output {tmp_path}/%j/%j_%t_log.out" in text  # one log per rank


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's Slurm executor needs srun")
def test_cpu_only_request_asks_for_no_gpus(tmp_path):
    cfg = slurm.resolve_config(
        REPO / "conf" / "defaults.yaml",
        flags={"gpus_per_node": 0, "tasks_per_node": 2, "folder": str(tmp_path / "%j")},
    )
    executor = slurm.make_executor(cfg.launch, local=False, name="x")
    text = executor._executor._make_submission_file_text("CMD", "uid")
    assert "#SBATCH --ntasks-per-node=2" in text
    assert "gpus" not in text and "--mem" not in text


def rank_sum_job() -> dict:
    """Runs in each task: export the rendezvous from the job environment, then a real gloo
    all-reduce of (rank + 1)."""
    import torch

    from launch.jobs import export_distributed_env
    from pipeline.distributed import collectives, group

    exported = export_distributed_env()
    env = group.init(timeout_s=60)
    total = collectives.all_reduce_sum(torch.tensor([float(env.rank + 1)]))
    group.destroy()
    return {"rank": env.rank, "world": env.world_size, "sum": float(total), "env": exported}


@pytest.mark.distributed
def test_local_executor_runs_two_ranks_that_rendezvous(tmp_path):
    import submitit

    from launch.task import PYTHON

    # Each task runs launch.task, as in jobs launch.slurm submits (make_executor).
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="local", local_python=PYTHON)
    executor.update_parameters(tasks_per_node=2, timeout_min=2, gpus_per_node=0)
    job = executor.submit(rank_sum_job)
    results = job.results()
    assert job.state == "FINISHED"
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in results)
    assert {r["env"]["LOCAL_RANK"] for r in results} == {"0", "1"}
    assert len({r["env"]["MASTER_PORT"] for r in results}) == 1


def test_cli_reports_errors_and_submits_nothing(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.slurm",
            "train",
            "--config",
            str(tmp_path / "missing.yaml"),
            "--local",
            "--folder",
            str(tmp_path / "jobs" / "%j"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "missing.yaml' does not exist" in proc.stderr
    assert "nothing was submitted" in proc.stderr
    assert not (tmp_path / "jobs").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_local_evaluate_runs_pipeline_evaluate_in_two_tasks(tmp_path, synthetic_shards):
    from tests.slurm.tiny_run import SHARDS, launcher_cli, random_weights, tiny_config

    shards = synthetic_shards(**SHARDS)
    config = tiny_config(tmp_path / "run.yaml", shards, tmp_path, steps=2, ckpt_every=2)
    weights = random_weights(config, tmp_path / "w.safetensors")
    proc = launcher_cli(
        *("evaluate", "--config", str(config), "--weights", str(weights), "--local"),
        *("--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "10"),
        *("--folder", f"{tmp_path}/jobs/%j"),
        timeout_s=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"submitted evaluate job \d+ locally: 1 node\(s\) x 2 task\(s\)", proc.stdout)
    assert "evaluate job" in proc.stdout and "completed" in proc.stdout
    # pipeline evaluate's default for weights outside a run: <train.output_dir>/evaluations/<time>
    (out,) = (tmp_path / "train" / "evaluations").iterdir()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_queries"] == 48  # 8 test classes x 6 images, each embedded once
    assert np.array_equal(np.load(out / "index.npy"), np.arange(48))
    logs = sorted((tmp_path / "jobs").glob("*/*_log.out"))
    assert len(logs) == 2  # one log per rank
    assert {"rank 0/2", "rank 1/2"} <= {
        m for p in logs for m in re.findall(r"rank \d/2", p.read_text())
    }


# ---------------------------------------------------------------------------- array evaluation


def test_plan_parts_is_contiguous_balanced_and_complete(tmp_path):
    from pipeline.eval.parts import plan_parts

    for i in range(7):
        (tmp_path / f"x-{i:06d}.tar").write_bytes(b"")
    urls = [str(tmp_path / f"x-{i:06d}.tar") for i in range(7)]
    plan = plan_parts(str(tmp_path), 3)
    assert [u for part in plan for u in part] == urls  # every shard once, in order
    assert sorted(len(p) for p in plan) == [2, 2, 3]
    assert plan_parts(str(tmp_path), 50) == [[u] for u in urls]  # never an empty part


def _write_part(out: Path, i: int, index: list[int], stamp: str) -> None:
    from pipeline.rundir import EvalDir

    path = EvalDir(out).part(i)
    path.parent.mkdir(parents=True, exist_ok=True)
    idx = np.array(index, np.int64)
    emb = np.stack([idx * 1.0, -idx * 1.0], axis=1).astype(np.float32)
    np.savez(path, emb=emb, labels=idx % 3, index=idx, fingerprint=stamp)


def test_merge_parts_orders_by_global_index(tmp_path):
    from pipeline.eval.parts import merge_parts

    _write_part(tmp_path, 0, [4, 0, 2], "a")
    _write_part(tmp_path, 1, [1, 5, 3], "b")
    e = merge_parts(tmp_path, 2, expected_rows=6, stamps=["a", "b"])
    assert e.row_N.tolist() == [0, 1, 2, 3, 4, 5]
    assert e.emb_ND[:, 0].tolist() == [0, 1, 2, 3, 4, 5]  # rows travel with their index
    assert e.labels_N.tolist() == [0, 1, 2, 0, 1, 2]


def test_merge_parts_refuses_missing_stale_duplicate_and_short(tmp_path):
    from pipeline.eval.parts import merge_parts

    _write_part(tmp_path, 0, [0, 1], "a")
    with pytest.raises(ValueError, match=r"1 of 2 evaluation parts are missing .*part_00001\.npz"):
        merge_parts(tmp_path, 2, None)
    _write_part(tmp_path, 1, [1, 2], "b")
    with pytest.raises(ValueError, match=r"part_00001\.npz was computed from other weights"):
        merge_parts(tmp_path, 2, None, stamps=["a", "new"])
    with pytest.raises(ValueError, match=r"catalog row 1 appears in two parts"):
        merge_parts(tmp_path, 2, None, stamps=["a", "b"])
    _write_part(tmp_path, 1, [2], "b")
    with pytest.raises(ValueError, match=r"hold 3 samples, the eval split's index.parquet lists 4"):
        merge_parts(tmp_path, 2, 4)


def test_evaluate_needs_one_existing_checkpoint(tmp_path):
    with pytest.raises(LaunchError, match=r"pass the trained weights once, as --weights PATH"):
        slurm.submit("evaluate", REPO / "conf" / "defaults.yaml", ["eval.ks=[1]"], local=True)
    with pytest.raises(LaunchError, match=r"--weights 'nope.safetensors' does not exist"):
        slurm.submit("evaluate", REPO / "conf" / "defaults.yaml", ["checkpoint=nope.safetensors"])
    with pytest.raises(LaunchError, match=r"--parts splits an evaluation"):
        slurm.submit("train", REPO / "conf" / "defaults.yaml", local=True, parts=2)


GUARD_SCRIPT = """
import os, signal, sys, time
from submitit.core.job_environment import JobEnvironment
from launch.jobs import guard_requeue_signal

log = sys.argv[1]
sig = JobEnvironment._usr_sig()
# Stands in for submitit's handler (checkpoint, scontrol requeue, exit): records who ran it.
signal.signal(sig, lambda s, f: open(log, "a").write(f"{os.getpid()}\\n"))
guard_requeue_signal()
child = os.fork()  # as a DataLoader worker is forked from the task
if child == 0:
    time.sleep(1.0)
    os._exit(0)
time.sleep(0.2)
os.kill(child, sig)  # Slurm signals every process of the step
os.kill(os.getpid(), sig)
os.waitpid(child, 0)
print(os.getpid())
"""


def test_requeue_signal_acts_only_in_the_task_not_in_forked_workers(tmp_path):
    log = tmp_path / "handled.txt"
    proc = subprocess.run(
        [sys.executable, "-c", GUARD_SCRIPT, str(log)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    )
    assert log.read_text().split() == [proc.stdout.strip()]  # the parent only, once
