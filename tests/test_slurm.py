"""Real Slurm: the launcher against the one-node cluster of tests/slurm/start_local_slurm.sh.

The session fixture starts the cluster when it is not running (as root, installing Debian's
Slurm packages if missing) and stops it at the end only if it started it. Every test has its
own submitit folder: job ids restart at 1 whenever the Slurm state is purged.
"""

from __future__ import annotations

import os

import pytest

from tests.slurm.local_cluster import LocalSlurm, wait_state

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
