"""Multi-host: real Slurm jobs across the hosts of tests/cluster/start_cluster.sh (network
namespaces on this machine, one slurmd each). The module fixture starts a 2-host cluster when
none answers (as root; packages are installed if missing) and stops it at the end, also when a
test fails; on a cluster started by hand only this module's jobs are cancelled."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.cluster.cluster import REPO, NamespaceCluster, python
from tests.slurm.tiny_run import make_shards

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
    checked. Measured: 17-22 s (4 torch imports time-sharing 2 cores), plus 5 s to start the
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


# ---------------------------------------------------------------------------- training


def _train_config(tmp: Path, shards: Path, name: str) -> Path:
    """Tiny, deterministic, frozen BatchNorm (so that per-rank batch statistics cannot make
    the two layouts differ): 4 steps of 2 ranks x (4 classes x 2 images) at 32 px."""
    cfg = {
        "data": {
            "train": [{"name": "synthetic", "urls": str(shards / "train")}],
            "eval_urls": str(shards / "test"),
            "image_size": 32,
            "resize_size": 32,
            "num_workers": 0,
        },
        "sampler": {"classes_per_batch": 4, "samples_per_class": 2, "steps_per_epoch": 4},
        "model": {"backbone": "test_resnet", "embedding_dim": 16, "freeze_bn": True},
        "optim": {"lr": 1e-3},
        "train": {
            "output_dir": str(tmp / name),
            "epochs": 1,
            "checkpoint_every": 4,
            "log_every": 1,
            "deterministic": True,
        },
        "eval": {"batch_size": 16, "ks": [1, 2]},
        "tracking": {"uri": f"sqlite:///{tmp / name / 'mlflow.db'}", "experiment": "multinode"},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_hosts_train_like_two_processes_on_one_host(cluster, tmp_path):
    """`srun -N2 --ntasks-per-node=1 pipeline train` (one rank per host, gloo across the
    bridge) ends with the weights of `torchrun --nproc_per_node 2` on one host.

    Tolerance: |difference| <= 1e-6 per float32 weight; measured: bitwise equal, twice (a
    2-rank gloo sum is the same addition on either layout). Measured: 133-143 s on the shared
    2-core machine (the two trainings one after the other, each: imports, DeepSpeed start-up,
    4 steps, a checkpoint and the final evaluation)."""
    shards = make_shards(tmp_path / "shards")
    ref = _train_config(tmp_path, shards, "one_host")
    command = ["-m", "pipeline.cli", "train", "--config"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    one_host = subprocess.run(
        [python(), *torchrun, *command, str(ref)],
        env=cluster.env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert one_host.returncode == 0, one_host.stderr[-3000:]

    cfg = _train_config(tmp_path, shards, "two_hosts")
    proc = cluster.srun(
        ["-N2", "--ntasks-per-node=1"],
        [python(), *command, str(cfg)],
        timeout_s=300,
        OMP_NUM_THREADS="1",
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    ref_result = json.loads((tmp_path / "one_host" / "result.json").read_text())
    result = json.loads((tmp_path / "two_hosts" / "result.json").read_text())
    assert result["step"] == ref_result["step"] == 4
    ref_w = load_file(str(tmp_path / "one_host" / "model.safetensors"))
    got_w = load_file(str(tmp_path / "two_hosts" / "model.safetensors"))
    assert ref_w.keys() == got_w.keys()
    worst = max((ref_w[k].double() - got_w[k].double()).abs().max().item() for k in ref_w)
    assert worst <= 1e-6, f"largest weight difference {worst:.3g}"
    assert result["metrics"] == pytest.approx(ref_result["metrics"], abs=1e-6)
