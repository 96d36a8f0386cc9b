"""The rank environment: the only module that reads RANK / WORLD_SIZE / SLURM_* variables.

Three environments are recognised:

* torchrun (or submitit's ``TorchDistributedEnvironment``, which exports the same
  names): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, with the host's share
  from LOCAL_WORLD_SIZE and GROUP_RANK (torchrun) or NODE_RANK / SLURM_NODEID;
* a Slurm job step (``srun``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID and
  the tasks per node (SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE or
  SLURM_NTASKS_PER_NODE), with the master address taken from the step's first node;
* nothing: one process.

A partially set environment is an error. Joining the group (:mod:`pipeline.distributed.group`)
writes the decided values back under the torchrun names (:func:`export_env`), so libraries that
read the environment (DeepSpeed reads LOCAL_RANK and LOCAL_SIZE) see the same ranks as the
pipeline.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import MutableMapping
from dataclasses import dataclass

from pipeline.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID")


# Tasks per node, most specific first: the step's own layout, the job's, the uniform request.
SLURM_LAYOUT_VARS = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")


class DistributedEnvError(UserError, RuntimeError):
    """The rank environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # 'torchrun', 'slurm' or 'single'
    local_world_size: int = 1  # ranks on this host
    node_rank: int = 0  # this host's index among the job's hosts


def _int_var(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError as e:
        raise DistributedEnvError(f"{name}={env[name]!r} is not an integer") from e


_TASK_COUNT = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def _tasks_per_node(env: dict, name: str) -> list[int]:
    """Slurm's compressed task counts ('2(x3),1' = hosts with 2, 2, 2 and 1 tasks)."""
    counts: list[int] = []
    for item in env[name].split(","):
        m = _TASK_COUNT.fullmatch(item.strip())
        if m is None or int(m.group(1)) < 1:
            raise DistributedEnvError(
                f"{name}={env[name]!r} is not a Slurm task count list such as '2(x3),1'; "
                "run the job with srun, which sets it"
            )
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _slurm_local_layout(env: dict) -> tuple[int, int]:
    """(tasks on this node, node index) inside a Slurm step."""
    node_rank = _int_var(env, "SLURM_NODEID")
    name = next((v for v in SLURM_LAYOUT_VARS if v in env), None)
    if name is None:
        raise DistributedEnvError(
            f"partial Slurm environment: none of {', '.join(SLURM_LAYOUT_VARS)} is set inside "
            "a job step; run the job with srun, which sets them"
        )
    if name == "SLURM_NTASKS_PER_NODE":
        return _int_var(env, name), node_rank
    counts = _tasks_per_node(env, name)
    if not 0 <= node_rank < len(counts):
        raise DistributedEnvError(
            f"SLURM_NODEID={node_rank} is outside the {len(counts)} nodes of "
            f"{name}={env[name]!r}; the variables come from different steps"
        )
    return counts[node_rank], node_rank


def _torchrun_local_layout(env: dict, world_size: int) -> tuple[int, int]:
    """(ranks on this host, host index) for a torchrun-style environment."""
    if "LOCAL_WORLD_SIZE" in env:
        local_world_size = _int_var(env, "LOCAL_WORLD_SIZE")
    else:
        # The five variables alone (tests, hand-made launches) describe ranks on one host.
        local_world_size = world_size
    for name in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
        if name in env:
            return local_world_size, _int_var(env, name)
    if local_world_size != world_size:
        raise DistributedEnvError(
            f"LOCAL_WORLD_SIZE={local_world_size} is less than WORLD_SIZE={world_size} but "
            "none of GROUP_RANK, NODE_RANK, SLURM_NODEID says which host this is; set NODE_RANK"
        )
    return local_world_size, 0


def _slurm_master_addr(env: dict) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise DistributedEnvError(
            "SLURM_PROCID is set but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is: "
            "run the job with srun, or set MASTER_ADDR and MASTER_PORT"
        )
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # A single host name needs no expansion.
        if "[" not in nodelist and "," not in nodelist:
            return nodelist
        raise DistributedEnvError(
            f"cannot expand the Slurm node list {nodelist!r} (scontrol failed): set MASTER_ADDR"
        ) from None


def read_env(env: dict | None = None) -> DistEnv:
    """Decide rank, world size and rendezvous from the environment (no side effects)."""
    env = dict(os.environ if env is None else env)
    present = [v for v in TORCHRUN_VARS if v in env]
    if present:
        missing = [v for v in TORCHRUN_VARS if v not in env]
        if missing:
            raise DistributedEnvError(
                f"partial torchrun environment: {', '.join(present)} set but "
                f"{', '.join(missing)} missing; launch with torchrun or srun, "
                f"or unset {', '.join(present)} to run as one process"
            )
        local_world_size, node_rank = _torchrun_local_layout(env, _int_var(env, "WORLD_SIZE"))
        e = DistEnv(
            rank=_int_var(env, "RANK"),
            world_size=_int_var(env, "WORLD_SIZE"),
            local_rank=_int_var(env, "LOCAL_RANK"),
            master_addr=env["MASTER_ADDR"],
            master_port=_int_var(env, "MASTER_PORT"),
            source="torchrun",
            local_world_size=local_world_size,
            node_rank=node_rank,
        )
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        missing = [v for v in SLURM_VARS if v not in env]
        if missing:
            raise DistributedEnvError(
                f"partial Slurm environment: {', '.join(missing)} missing inside a job step"
            )
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        local_world_size, node_rank = _slurm_local_layout(env)
        e = DistEnv(
            rank=_int_var(env, "SLURM_PROCID"),
            world_size=_int_var(env, "SLURM_NTASKS"),
            local_rank=_int_var(env, "SLURM_LOCALID"),
            master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(env),
            # A port derived from the job id lets two jobs share a node.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            source="slurm",
            local_world_size=local_world_size,
            node_rank=node_rank,
        )
    else:
        return DistEnv(0, 1, 0, "127.0.0.1", 29500, "single", local_world_size=1, node_rank=0)
    if not 0 <= e.rank < e.world_size:
        raise DistributedEnvError(f"rank {e.rank} is outside [0, world size {e.world_size})")
    if e.local_rank < 0 or e.local_rank > e.rank:
        raise DistributedEnvError(
            f"local rank {e.local_rank} is impossible for global rank {e.rank}"
        )
    if not 0 <= e.local_rank < e.local_world_size <= e.world_size:
        raise DistributedEnvError(
            f"local rank {e.local_rank} of {e.local_world_size} ranks on this host does not fit "
            f"a world of {e.world_size} ({e.source} variables); they must satisfy "
            "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE"
        )
    # Hosts before this one hold at least one rank each.
    if e.node_rank < 0 or (e.node_rank > 0 and e.node_rank + e.local_world_size > e.world_size):
        raise DistributedEnvError(
            f"node rank {e.node_rank} with {e.local_world_size} ranks on this host does not fit "
            f"a world of {e.world_size} ({e.source} variables); check NODE_RANK / GROUP_RANK / "
            "SLURM_NODEID against LOCAL_WORLD_SIZE and WORLD_SIZE"
        )
    return e


def export_env(e: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Write ``e`` under the names libraries read: RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT (the process's environment by
    default). ``read_env`` of the result gives ``e`` again.

    DeepSpeed's CPU shared-memory all-reduce assumes every rank is on this host when its
    LOCAL_SIZE equals the world size (deepspeed/ops/csrc/cpu/comm/shm_interface.cpp); unset,
    it counts as 0 and the op stays off. So LOCAL_SIZE is written when the job spans hosts
    (it is then below the world size) or when something already set it (a stale value must
    not claim the whole world is local); a one-host run is left as DeepSpeed treats it today.
    """
    environ = os.environ if environ is None else environ
    environ.update(
        RANK=str(e.rank),
        WORLD_SIZE=str(e.world_size),
        LOCAL_RANK=str(e.local_rank),
        LOCAL_WORLD_SIZE=str(e.local_world_size),
        NODE_RANK=str(e.node_rank),
        MASTER_ADDR=e.master_addr,
        MASTER_PORT=str(e.master_port),
    )
    # torchrun's own name for the host index must not contradict NODE_RANK.
    if "GROUP_RANK" in environ:
        environ["GROUP_RANK"] = str(e.node_rank)
    if "LOCAL_SIZE" in environ or e.local_world_size < e.world_size:
        environ["LOCAL_SIZE"] = str(e.local_world_size)
