"""Real Slurm: the launcher against the one-node cluster of tests/slurm/start_local_slurm.sh.

The session fixture starts the cluster when it is not running (as root, installing Debian's
Slurm packages if missing) and stops it at the end only if it started it. Every test has its
own submitit folder: job ids restart at 1 whenever the Slurm state is purged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.local_cluster import TERMINAL_STATES, LocalSlurm, job_state, wait_state
from tests.slurm.tiny_run import REPO, SHARDS, launcher_cli, random_weights, tiny_config

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = LocalSlurm()
    try:
        cluster.ensure()
    except PermissionError as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.close()


def _job_facts(x: int) -> dict:
    # Runs inside the job: what Slurm and submitit say about where it runs.
    import submitit

    env = submitit.JobEnvironment()
    return {
        "square": x * x,
        "job_id": env.job_id,
        "rank": env.global_rank,
        "num_tasks": env.num_tasks,
        "pid": os.getpid(),
    }


def test_plain_function_runs_and_completes(slurm_cluster, tmp_path):
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(
        timeout_min=2, slurm_partition="debug", cpus_per_task=1, tasks_per_node=1
    )
    job = executor.submit(_job_facts, 7)
    assert wait_state(job.job_id, ("COMPLETED",), timeout_s=60) == "COMPLETED", job.stderr()
    facts = job.result()
    assert facts["square"] == 49
    assert facts["job_id"] == job.job_id
    assert (facts["rank"], facts["num_tasks"]) == (0, 1)
    assert facts["pid"] != os.getpid()  # it really ran elsewhere
    assert job.state == "COMPLETED"


# ---------------------------------------------------------------------------- the launcher


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    return synthetic_shards(**SHARDS)


def next_job_id() -> int:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    return int(re.search(r"NEXT_JOB_ID\s*=\s*(\d+)", out).group(1))


def job_logs(folder: Path, job_id: str) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((folder / job_id).glob("*_log.*"))
    )


def mlflow_run(uri: str, run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    loss_steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    runs = client.search_runs([run.info.experiment_id])
    return run, sorted(loss_steps), runs


def test_train_job_through_the_cli(slurm_cluster, shards, tmp_path):
    steps = 6
    config = tiny_config(tmp_path / "run.yaml", shards, tmp_path, steps=steps, ckpt_every=3)
    jobs = tmp_path / "jobs"
    proc = launcher_cli(
        *("train", "--config", str(config), "optim.lr=0.002"),
        *("--cluster", "localslurm", "--folder", f"{jobs}/%j"),
    )
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted train job (\d+) to partition debug", proc.stdout).group(1)
    assert f"log rank 1:  {jobs}/{job_id}/{job_id}_1_log.out" in proc.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in proc.stdout

    state = wait_state(job_id, ("COMPLETED",), timeout_s=240)
    assert state == "COMPLETED", job_logs(jobs, job_id)
    import submitit

    results = submitit.SlurmJob(jobs / "%j", job_id, tasks=[0, 1]).results()
    main = results[0]
    assert [r["step"] for r in results] == [steps, steps]
    assert main["resumed_from"] is None
    # Both ranks ran in one process group: rank 0 reports the 2-rank world it trained in.
    ckpt = tmp_path / "train" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{steps:08d}"
    assert Path(main["weights"]).is_file()

    run, loss_steps, runs = mlflow_run(main["tracking_uri"], main["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    assert run.data.params["optim.lr"] == "0.002"  # the override reached the job
    assert run.data.params["launch.partition"] == "debug"  # the cluster file did too
    assert loss_steps == [3, 6]
    assert len(runs) == 1

    log0 = (jobs / job_id / f"{job_id}_0_log.out").read_text()
    assert "rank 0/2" in log0 and "restart 0" in log0
    assert "rank 1/2" in (jobs / job_id / f"{job_id}_1_log.out").read_text()


def test_requeued_job_resumes_from_its_checkpoint(slurm_cluster, shards, tmp_path):
    from launch import slurm

    # The interruption lands a step or two after the first checkpoint (step 2); 16 steps
    # leave a wide margin before the end even on a fast machine.
    steps = 16
    config = tiny_config(tmp_path / "run.yaml", shards, tmp_path, steps=steps, ckpt_every=2)
    sub = slurm.submit("train", config, cluster="localslurm", flags={"folder": f"{tmp_path}/%j"})
    job = sub.job
    latest = tmp_path / "train" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.is_file():
        state = job_state(job.job_id)
        assert state not in TERMINAL_STATES, (state, job_logs(tmp_path, job.job_id))
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.1)
    first_run_id = (tmp_path / "train" / "mlflow_run.txt").read_text().strip()
    # What Slurm does on preemption: SIGTERM (submitit ignores it), then USR2 to every task.
    job._interrupt()

    state = wait_state(job.job_id, ("COMPLETED",), timeout_s=300)
    assert state == "COMPLETED", job_logs(tmp_path, job.job_id)
    attempts = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job.job_id],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert attempts[0] == "REQUEUED" and attempts[-1] == "COMPLETED", attempts

    main = job.results()[0]
    assert main["step"] == steps
    assert main["resumed_from"] is not None and 2 <= main["resumed_from"] < steps
    assert main["run_id"] == first_run_id  # the same MLflow run continued
    run, loss_steps, runs = mlflow_run(main["tracking_uri"], main["run_id"])
    assert run.info.status == "FINISHED"
    assert loss_steps == list(range(2, steps + 1, 2))  # every step once, none lost or doubled
    assert len(runs) == 1
    log0 = (tmp_path / job.job_id / f"{job.job_id}_0_log.out").read_text()
    assert "restart 0" in log0 and "restart 1" in log0
    err0 = (tmp_path / job.job_id / f"{job.job_id}_0_log.err").read_text()
    assert "Caught signal SIGUSR2 on" in err0 and "this job is preempted" in err0
    assert "resubmitting; the job resumes from the latest checkpoint" in err0


def test_bad_requests_fail_before_anything_is_submitted(slurm_cluster, tmp_path):
    from launch import slurm
    from launch.cluster import LaunchError
    from pipeline.config.schema import ConfigError

    config = REPO / "conf" / "defaults.yaml"
    before = next_job_id()
    folder = {"folder": f"{tmp_path}/jobs/%j"}
    cases = [
        (
            {"partition": "nope"},
            r"partition 'nope' does not exist on this cluster.*available: debug",
        ),
        ({"gpus_per_node": 8}, r"--gpus-per-node 8 on partition 'debug': it has no GPUs: pass"),
        ({"nodes": 2}, r"--nodes 2: partition 'debug' has only 1 node\(s\)"),
        ({"cpus_per_task": 512}, r"2 tasks x 512 CPUs per task = 1024 CPUs per node, but"),
    ]
    for flags, message in cases:
        with pytest.raises(LaunchError, match=message):
            slurm.submit("train", config, cluster="localslurm", flags={**flags, **folder})
    with pytest.raises(ConfigError, match=r"config file '.*missing\.yaml' does not exist"):
        slurm.submit("train", tmp_path / "missing.yaml", cluster="localslurm", flags=folder)
    proc = launcher_cli(
        *("train", "--config", str(config), "--cluster", "localslurm"),
        *("--partition", "gpu-nope", "--folder", folder["folder"]),
    )
    assert proc.returncode == 2
    assert "partition 'gpu-nope' does not exist" in proc.stderr
    assert "nothing was submitted" in proc.stderr
    assert next_job_id() == before
    assert not (tmp_path / "jobs").exists()


def test_array_evaluation_matches_one_process(slurm_cluster, shards, tmp_path):
    import numpy as np
    import submitit
    import torch
    from safetensors.torch import load_file

    from pipeline.config.load import load_config
    from pipeline.eval.evaluator import compute_metrics
    from pipeline.eval.extract import extract_embeddings
    from pipeline.model import load_trained_model
    from pipeline.weights import weights_sha256

    config = tiny_config(tmp_path / "run.yaml", shards, tmp_path, steps=2, ckpt_every=2)
    weights = random_weights(config, tmp_path / "w.safetensors")
    out = tmp_path / "eval"
    jobs = tmp_path / "jobs"
    proc = launcher_cli(
        *("evaluate", "--config", str(config), "--weights", str(weights), f"eval.output_dir={out}"),
        *("--cluster", "localslurm", "--tasks-per-node", "1", "--parts", "2"),
        *("--folder", f"{jobs}/%j"),
    )
    assert proc.returncode == 0, proc.stderr
    merge_id = re.search(r"submitted evaluate job (\d+)", proc.stdout).group(1)
    array_id = re.search(r"extraction:  2 task\(s\) (\d+)_0, \1_1", proc.stdout).group(1)
    # The merge job waits for the whole array (afterok), then runs.
    state = wait_state(merge_id, ("COMPLETED",), timeout_s=240)
    assert state == "COMPLETED", job_logs(jobs, merge_id) + job_logs(jobs, f"{array_id}_0")
    assert job_state(array_id) == "COMPLETED"
    merged = submitit.SlurmJob(jobs / "%j", merge_id).result()

    # The same evaluation in this process, on all shards at once.
    cfg = load_config(config)
    model = load_trained_model(weights, cfg.model)
    torch.set_num_threads(1)
    whole = extract_embeddings(
        model, cfg.data.eval_urls, cfg.data, device="cpu", batch_size=16, progress=False
    )
    parts = [np.load(out / "parts" / f"part_{i:05d}.npz") for i in range(2)]
    part_index = [set(p["index"].tolist()) for p in parts]
    assert part_index[0] and part_index[1] and not part_index[0] & part_index[1]
    assert part_index[0] | part_index[1] == set(range(48))  # 8 test classes x 6 images
    np.testing.assert_array_equal(np.load(out / "index.npy"), whole.row_N)
    np.testing.assert_array_equal(np.load(out / "labels.npy"), whole.labels_N)
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), whole.emb_ND, atol=1e-5)
    expected = compute_metrics(whole, cfg.data, cfg.eval).metrics
    assert merged["metrics"] == pytest.approx(expected, abs=1e-6)
    on_disk = json.loads((out / "metrics.json").read_text())
    measured = on_disk.pop("weights")  # the weights every part embedded with
    identity = weights_sha256(load_file(weights))
    assert (measured["path"], measured["weights_sha256"]) == (str(weights), identity)
    assert on_disk == pytest.approx(expected, abs=1e-6)

    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(merged["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["kind"] == "evaluate"
    assert run.data.tags["weights_sha256"] == identity
    assert run.data.metrics["eval/recall_at_1"] == pytest.approx(expected["recall@1"])
