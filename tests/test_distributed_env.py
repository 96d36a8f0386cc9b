import pytest
import torch

from pipeline.distributed import collectives, group
from pipeline.distributed.env import DistributedEnvError, export_env, read_env


def test_single_process_when_nothing_is_set():
    env = read_env({})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")


def test_torchrun_variables():
    env = read_env(
        dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node1", MASTER_PORT="1234")
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        3,
        8,
        1,
        "node1",
        1234,
    )
    assert env.source == "torchrun"


def test_partial_torchrun_environment_is_an_error():
    with pytest.raises(
        DistributedEnvError,
        match="partial torchrun environment: RANK, WORLD_SIZE set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing",
    ):
        read_env(dict(RANK="0", WORLD_SIZE="2"))


def test_slurm_step_variables():
    env = read_env(
        dict(
            SLURM_STEP_ID="0",
            SLURM_PROCID="5",
            SLURM_NTASKS="8",
            SLURM_LOCALID="1",
            SLURM_NODEID="0",
            SLURM_STEP_TASKS_PER_NODE="8",
            SLURM_JOB_ID="77",
            SLURM_STEP_NODELIST="gpu7",
        )
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu7")
    assert (env.local_world_size, env.node_rank) == (8, 0)
    assert env.master_port == 20077
    assert env.source == "slurm"


def test_partial_slurm_environment_is_an_error():
    with pytest.raises(
        DistributedEnvError, match="SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID missing"
    ):
        read_env(dict(SLURM_STEP_ID="0", SLURM_PROCID="0"))


def test_inconsistent_values_are_errors():
    base = dict(LOCAL_RANK="0", MASTER_ADDR="a", MASTER_PORT="1")
    with pytest.raises(DistributedEnvError, match=r"rank 4 is outside \[0, world size 4\)"):
        read_env(dict(base, RANK="4", WORLD_SIZE="4"))
    with pytest.raises(DistributedEnvError, match="RANK='x' is not an integer"):
        read_env(dict(base, RANK="x", WORLD_SIZE="4"))


# ---------------------------------------------------------------- hosts: local size, node rank

TORCHRUN_4 = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="n1", MASTER_PORT="29500")
# What srun sets for task 3 of `srun -N2 --ntasks-per-node=2` (second host, second task).
SRUN_2X2 = dict(
    SLURM_STEP_ID="0",
    SLURM_PROCID="3",
    SLURM_NTASKS="4",
    SLURM_LOCALID="1",
    SLURM_NODEID="1",
    SLURM_JOB_ID="12",
    SLURM_STEP_NODELIST="n1",
    SLURM_STEP_TASKS_PER_NODE="2(x2)",
    SLURM_TASKS_PER_NODE="2(x2)",
    SLURM_NTASKS_PER_NODE="2",
)


def test_the_five_torchrun_variables_alone_mean_one_host():
    env = read_env(TORCHRUN_4)
    assert (env.local_world_size, env.node_rank) == (4, 0)


def test_torchrun_host_layout():
    env = read_env(dict(TORCHRUN_4, LOCAL_WORLD_SIZE="2", GROUP_RANK="1"))
    assert (env.local_world_size, env.node_rank) == (2, 1)
    # submitit exports LOCAL_WORLD_SIZE but no GROUP_RANK: the Slurm node id says the host.
    env = read_env(dict(TORCHRUN_4, LOCAL_WORLD_SIZE="2", SLURM_NODEID="1"))
    assert (env.local_world_size, env.node_rank) == (2, 1)
    # GROUP_RANK (torchrun's own) wins over a NODE_RANK left in the environment.
    env = read_env(dict(TORCHRUN_4, LOCAL_WORLD_SIZE="2", GROUP_RANK="1", NODE_RANK="0"))
    assert env.node_rank == 1


def test_srun_host_layout():
    env = read_env(SRUN_2X2)
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    assert (env.local_world_size, env.node_rank) == (2, 1)
    assert env.source == "slurm"


def test_srun_uneven_hosts_use_the_step_layout():
    # 5 tasks on 2 hosts (srun -n5 -N2): 3 then 2; the job's own layout is ignored.
    uneven = dict(
        SRUN_2X2,
        SLURM_PROCID="4",
        SLURM_NTASKS="5",
        SLURM_STEP_TASKS_PER_NODE="3,2",
        SLURM_TASKS_PER_NODE="2(x2)",
    )
    del uneven["SLURM_NTASKS_PER_NODE"]
    env = read_env(uneven)
    assert (env.local_world_size, env.node_rank) == (2, 1)
    env = read_env(dict(uneven, SLURM_PROCID="2", SLURM_LOCALID="2", SLURM_NODEID="0"))
    assert (env.local_world_size, env.node_rank) == (3, 0)
    env = read_env(dict(uneven, SLURM_STEP_TASKS_PER_NODE="1,2(x2)", SLURM_NODEID="2"))
    assert env.local_world_size == 2


def test_srun_without_the_step_layout_falls_back():
    only_job = {k: v for k, v in SRUN_2X2.items() if k != "SLURM_STEP_TASKS_PER_NODE"}
    assert read_env(only_job).local_world_size == 2
    only_request = {k: v for k, v in only_job.items() if k != "SLURM_TASKS_PER_NODE"}
    assert read_env(only_request).local_world_size == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            dict(SLURM_STEP_TASKS_PER_NODE="2(x"),
            r"^SLURM_STEP_TASKS_PER_NODE='2\(x' is not a Slurm task count list such as "
            r"'2\(x3\),1'; run the job with srun, which sets it$",
        ),
        (
            dict(SLURM_STEP_TASKS_PER_NODE="0,4"),
            r"^SLURM_STEP_TASKS_PER_NODE='0,4' is not a Slurm task count list",
        ),
        (dict(SLURM_NODEID="one"), r"^SLURM_NODEID='one' is not an integer$"),
        (
            dict(SLURM_NODEID="2"),
            r"^SLURM_NODEID=2 is outside the 2 nodes of SLURM_STEP_TASKS_PER_NODE='2\(x2\)'",
        ),
        (
            dict(SLURM_STEP_TASKS_PER_NODE="1(x4)"),
            r"^local rank 1 of 1 ranks on this host does not fit a world of 4 \(slurm variables\); "
            r"they must satisfy 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE$",
        ),
    ],
)
def test_bad_srun_layouts_are_one_line_errors(change, message):
    with pytest.raises(DistributedEnvError, match=message) as err:
        read_env(dict(SRUN_2X2, **change))
    assert "\n" not in str(err.value)


def test_srun_without_any_layout_is_a_partial_environment():
    bare = {k: v for k, v in SRUN_2X2.items() if "TASKS_PER_NODE" not in k}
    with pytest.raises(
        DistributedEnvError,
        match=r"^partial Slurm environment: none of SLURM_STEP_TASKS_PER_NODE, "
        r"SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE is set inside a job step",
    ):
        read_env(bare)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(LOCAL_WORLD_SIZE="two"), r"^LOCAL_WORLD_SIZE='two' is not an integer$"),
        (dict(LOCAL_WORLD_SIZE="2", GROUP_RANK=""), r"^GROUP_RANK='' is not an integer$"),
        (
            dict(LOCAL_WORLD_SIZE="2"),
            r"^LOCAL_WORLD_SIZE=2 is less than WORLD_SIZE=4 but none of GROUP_RANK, NODE_RANK, "
            r"SLURM_NODEID says which host this is; set NODE_RANK$",
        ),
        (
            dict(LOCAL_WORLD_SIZE="8", NODE_RANK="0"),
            r"^local rank 1 of 8 ranks on this host does not fit a world of 4",
        ),
        (
            dict(LOCAL_WORLD_SIZE="2", NODE_RANK="3"),
            r"^node rank 3 with 2 ranks on this host does not fit a world of 4 \(torchrun "
            r"variables\); check NODE_RANK",
        ),
        (dict(LOCAL_WORLD_SIZE="2", NODE_RANK="-1"), r"^node rank -1 with 2 ranks"),
    ],
)
def test_bad_torchrun_layouts_are_one_line_errors(change, message):
    with pytest.raises(DistributedEnvError, match=message) as err:
        read_env(dict(TORCHRUN_4, **change))
    assert "\n" not in str(err.value)


def test_export_writes_what_read_env_decided():
    decided = read_env(SRUN_2X2)
    environ: dict[str, str] = {}
    export_env(decided, environ)
    assert environ == dict(
        RANK="3",
        WORLD_SIZE="4",
        LOCAL_RANK="1",
        LOCAL_WORLD_SIZE="2",
        NODE_RANK="1",
        MASTER_ADDR="n1",
        MASTER_PORT="20012",
        # Two hosts: DeepSpeed's shared-memory all-reduce must see a local size below the world.
        LOCAL_SIZE="2",
    )
    again = read_env(environ)
    assert (again.rank, again.world_size, again.local_rank) == (3, 4, 1)
    assert (again.local_world_size, again.node_rank) == (2, 1)
    assert (again.master_addr, again.master_port) == ("n1", 20012)


def test_export_keeps_deepspeed_local_size_consistent():
    one_host = read_env(dict(TORCHRUN_4, LOCAL_WORLD_SIZE="4", GROUP_RANK="0"))
    environ: dict[str, str] = {}
    export_env(one_host, environ)
    assert "LOCAL_SIZE" not in environ  # one host: left as DeepSpeed treats it today
    two_hosts = read_env(dict(TORCHRUN_4, LOCAL_WORLD_SIZE="2", GROUP_RANK="1"))
    # A stale LOCAL_SIZE equal to the world would switch DeepSpeed's shm op on across hosts.
    environ = dict(LOCAL_SIZE="4", GROUP_RANK="0")
    export_env(two_hosts, environ)
    assert (environ["LOCAL_SIZE"], environ["GROUP_RANK"], environ["NODE_RANK"]) == ("2", "1", "1")


def test_helpers_work_with_one_process():
    t = torch.arange(6.0, requires_grad=True)
    assert group.get_rank() == 0 and group.get_world_size() == 1
    assert group.is_main_process()
    assert collectives.all_gather_with_grad(t) is t
    assert collectives.all_gather_nograd(t) is t
    collectives.barrier()


def _later_group_times_out(rank: int, world: int, out: str) -> None:
    import datetime
    import time
    from pathlib import Path

    import torch.distributed as dist

    group.destroy()  # run_distributed's group has 120 s; rejoin with 3 s
    # Both ranks leave before either rejoins on the same port: a rank that rejoined first
    # would reach rank 0's old store just before it closes ("Broken pipe").
    Path(f"{out}.left{rank}").touch()
    deadline = time.monotonic() + 60
    while not all(Path(f"{out}.left{r}").exists() for r in range(world)):
        assert time.monotonic() < deadline, "the other rank never left its group"
        time.sleep(0.05)
    group.init(timeout_s=3)
    dp_group = dist.new_group(list(range(world)))  # as DeepSpeed makes its data-parallel group
    # Rank 0's store serves new_group's closing barrier: rank 0 may not leave (and take the
    # store with it) before rank 1 is out of new_group, which on a loaded machine can take
    # longer than rank 0's 3 s wait below ("Failed to recv" on rank 1, once in 4 full runs).
    joined = Path(f"{out}.joined{rank}")
    joined.touch()
    if rank == 0:
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=dp_group)  # rank 1 never joins
        except RuntimeError as e:  # gloo raises a plain RuntimeError, not DistError
            assert group.is_collective_error(e), e
            Path(out).write_text(str(time.monotonic() - t0))
        deadline = time.monotonic() + 60
        while not Path(f"{out}.joined1").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    else:  # wait (without a collective) until rank 0 is done
        deadline = time.monotonic() + 60
        while not Path(out).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert datetime.timedelta(seconds=3) == dist.distributed_c10d.default_pg_timeout


@pytest.mark.distributed
def test_collective_timeout_bounds_groups_made_later(tmp_path):
    """A group made after init (DeepSpeed's data-parallel group) fails a collective whose peer
    never comes within init's timeout, not torch's 30-minute default; the error is recognised
    as a failed collective (the trainer then names the job's hosts). Measured: ~10 s."""
    from tests.dist_helpers import run_distributed

    out = tmp_path / "waited_s"
    run_distributed(_later_group_times_out, 2, str(out))
    assert out.is_file(), "the all-reduce on the later group did not time out"
    assert 2.5 <= float(out.read_text()) < 15


def test_collective_errors_are_recognised():
    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting"
    assert group.is_collective_error(RuntimeError(gloo))
    assert group.is_collective_error(RuntimeError("Application timeout caused pair closure"))
    assert group.is_collective_error(torch.distributed.DistError("store timeout"))
    assert not group.is_collective_error(RuntimeError("mat1 and mat2 shapes cannot be"))
    assert not group.is_collective_error(ValueError("gloo/transport"))
