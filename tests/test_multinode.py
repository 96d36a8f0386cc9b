"""Multi-host: real Slurm jobs across the hosts of tests/cluster/start_cluster.sh (network
namespaces on this machine, one slurmd each). The module fixture starts a 2-host cluster when
none answers (as root; packages are installed if missing) and stops it at the end, also when a
test fails; on a cluster started by hand only this module's jobs are cancelled."""

from __future__ import annotations

import json

import pytest

from tests.cluster.cluster import NamespaceCluster, python

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

HOSTS = 2


@pytest.fixture(scope="module")
def cluster():
    c = NamespaceCluster(HOSTS)
    try:
        c.ensure()
    except PermissionError as e:
        pytest.skip(str(e))
    except BaseException:
        c.close()  # a half-started cluster is stopped too
        raise
    try:
        yield c
    finally:
        c.close()


def test_rank_environment_on_two_hosts(cluster, tmp_path):
    """`srun -N2 --ntasks-per-node=2`: 4 ranks, 2 per host, one gloo group across the hosts.
    Every rank's RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR and hostname are
    checked. Measured: 17 s (4 torch imports time-sharing 2 cores), plus 5 s to start the
    cluster (MariaDB already initialised) and 7 s to stop it; a first start installs packages."""
    proc = cluster.srun(
        ["-N2", "--ntasks-per-node=2"],
        [python(), "-m", "tests.cluster.rank_probe", str(tmp_path)],
        timeout_s=120,
        OMP_NUM_THREADS="1",
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]

    for rank, facts in enumerate(ranks):
        node, local = divmod(rank, 2)  # srun's default block distribution
        env = facts["env"]
        assert env["RANK"] == str(rank)
        assert env["WORLD_SIZE"] == "4"
        assert env["LOCAL_RANK"] == str(local)
        assert env["LOCAL_WORLD_SIZE"] == "2"
        assert env["NODE_RANK"] == str(node)
        assert facts["read_env"] == {"local_world_size": 2, "node_rank": node}
        assert env["MASTER_ADDR"] == "sapnode1"  # the step's first host
        # Each rank runs on its own host, under that host's name and address.
        assert facts["hostname"] == f"sapnode{node + 1}"
        assert facts["address"] == f"10.213.0.{11 + node}"
        # DeepSpeed's shared-memory all-reduce stays off: the local size is below the world.
        assert env["LOCAL_SIZE"] == "2"
        assert facts["backend"] == "gloo"
        assert facts["sum"] == 1 + 2 + 3 + 4
    assert len({f["env"]["MASTER_PORT"] for f in ranks}) == 1
