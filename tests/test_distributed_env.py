import pytest
import torch

from pipeline import distributed
from pipeline.distributed import DistributedEnvError, read_env


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
            SLURM_JOB_ID="77",
            SLURM_STEP_NODELIST="gpu7",
        )
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu7")
    assert env.master_port == 20077
    assert env.source == "slurm"


def test_partial_slurm_environment_is_an_error():
    with pytest.raises(DistributedEnvError, match="SLURM_NTASKS, SLURM_LOCALID missing"):
        read_env(dict(SLURM_STEP_ID="0", SLURM_PROCID="0"))


def test_inconsistent_values_are_errors():
    base = dict(LOCAL_RANK="0", MASTER_ADDR="a", MASTER_PORT="1")
    with pytest.raises(DistributedEnvError, match=r"rank 4 is outside \[0, world size 4\)"):
        read_env(dict(base, RANK="4", WORLD_SIZE="4"))
    with pytest.raises(DistributedEnvError, match="RANK='x' is not an integer"):
        read_env(dict(base, RANK="x", WORLD_SIZE="4"))


def test_helpers_work_with_one_process():
    t = torch.arange(6.0, requires_grad=True)
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert distributed.is_main_process()
    assert distributed.all_gather_with_grad(t) is t
    assert distributed.all_gather_nograd(t) is t
    distributed.barrier()
