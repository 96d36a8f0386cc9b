"""Cluster side of a launch: site defaults (``conf/cluster/*.yaml``) and checks against ``sinfo``.

Everything here runs on the submitting machine, before anything is submitted, so that a wrong
partition or an impossible request fails at once with a message that says what to change,
instead of a job that pends forever or dies in the queue.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

import torch  # only for a local launch that asks for GPUs

from pipeline.config.load import CONF_DIR, read_yaml_mapping
from pipeline.config.schema_services import LaunchConfig

CLUSTER_DIR = CONF_DIR / "cluster"


class LaunchError(ValueError):
    """A launch request that cannot work; the message names the value and the fix."""


def cluster_file(name: str) -> Path:
    """``name`` as a path if it is an existing file, else ``conf/cluster/<name>.yaml``."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = CLUSTER_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))
        raise LaunchError(
            f"--cluster {name!r}: no file {path}; known clusters: {', '.join(known) or 'none'} "
            f"(or pass the path of a YAML file of launch.* keys)"
        )
    return path


def cluster_overrides(name: str) -> list[str]:
    """The cluster file's keys as ``launch.KEY=VALUE`` overrides (JSON values are valid YAML)."""
    path = cluster_file(name)
    loaded = read_yaml_mapping(
        path, f"cluster file {path}", "a mapping of launch keys", error=LaunchError
    )
    if isinstance(loaded.get("launch"), dict):  # both `launch: {...}` and flat files are fine
        loaded = loaded["launch"]
    valid = [f.name for f in fields(LaunchConfig)]
    unknown = sorted(set(loaded) - set(valid))
    if unknown:
        raise LaunchError(
            f"cluster file {path}: unknown key(s) {', '.join(unknown)}; valid launch keys: "
            + ", ".join(valid)
        )
    return [f"launch.{k}={json.dumps(v)}" for k, v in loaded.items()]


def tasks_per_node(cfg: LaunchConfig) -> int:
    """One task per GPU unless set; one task on a CPU-only request."""
    if cfg.tasks_per_node:
        return cfg.tasks_per_node
    return max(1, cfg.gpus_per_node)


def local_gpu_count() -> int:
    """GPUs this machine's processes can use (CUDA_VISIBLE_DEVICES applies); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_local(cfg: LaunchConfig) -> None:
    """Refuse a ``--local`` request this machine cannot run (one node, its own GPUs)."""
    if cfg.nodes != 1:
        raise LaunchError(f"--nodes {cfg.nodes} with --local: a local run has 1 node")
    if cfg.gpus_per_node:
        have = local_gpu_count()
        if cfg.gpus_per_node > have:
            has = "has no GPU" if have == 0 else f"has only {have} GPU(s)"
            raise LaunchError(
                f"--gpus-per-node {cfg.gpus_per_node} (launch.gpus_per_node) with --local: this "
                f"machine {has} "
                "(torch.cuda.device_count(), CUDA_VISIBLE_DEVICES applies); pass "
                + (
                    "--gpus-per-node 0 --tasks-per-node N to run N CPU processes"
                    if have == 0
                    else f"--gpus-per-node {have} or fewer"
                )
                + ", or submit to SLURM without --local"
            )


@dataclass
class Partition:
    name: str
    is_default: bool
    nodes: int
    cpus_per_node: int  # the largest node of the partition
    gpus_per_node: int  # the largest GPU count of any node (0: no GPUs)
    state: str


def _gpu_count(gres: str) -> int:
    """Largest GPU count in a sinfo %G field such as 'gpu:a100:8(S:0-1),shard:2' or '(null)'."""
    best = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu":
            try:
                best = max(best, int(parts[-1]))
            except ValueError:
                best = max(best, 1)
    return best


def read_partitions() -> dict[str, Partition]:
    """Partitions as ``sinfo`` reports them (one line per partition and node configuration)."""
    if shutil.which("sinfo") is None:
        raise LaunchError(
            "no Slurm client on this machine (sinfo not found): submit from a login node of the "
            "cluster, or pass --local to run the job here"
        )
    proc = subprocess.run(
        ["sinfo", "-h", "-a", "-o", "%P|%D|%c|%G|%a"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise LaunchError(
            f"sinfo failed (exit {proc.returncode}): {proc.stderr.strip()}; is the Slurm "
            "controller reachable (check SLURM_CONF and `scontrol ping`)?"
        )
    parts: dict[str, Partition] = {}
    for line in proc.stdout.splitlines():
        cols = line.strip().split("|")
        if len(cols) != 5:
            continue
        name, nodes, cpus, gres, avail = cols
        default = name.endswith("*")
        name = name.rstrip("*")
        cpus_n = int(cpus.rstrip("+")) if cpus.rstrip("+").isdigit() else 0
        p = parts.setdefault(name, Partition(name, default, 0, 0, 0, avail))
        p.nodes += int(nodes) if nodes.isdigit() else 0
        p.cpus_per_node = max(p.cpus_per_node, cpus_n)
        p.gpus_per_node = max(p.gpus_per_node, _gpu_count(gres))
    return parts


def check_against_cluster(cfg: LaunchConfig) -> Partition:
    """Refuse a request the cluster cannot run; returns the partition it will go to."""
    parts = read_partitions()
    if not parts:
        raise LaunchError("sinfo lists no partitions: the cluster has none configured")
    if cfg.partition:
        if cfg.partition not in parts:
            raise LaunchError(
                f"partition {cfg.partition!r} does not exist on this cluster (launch.partition / "
                f"--partition); available: {', '.join(sorted(parts))}"
            )
        part = parts[cfg.partition]
    else:
        defaults = [p for p in parts.values() if p.is_default]
        if not defaults:
            raise LaunchError(
                "no --partition given and the cluster has no default partition; choose one of: "
                + ", ".join(sorted(parts))
            )
        part = defaults[0]
    where = f"partition {part.name!r}"
    if part.state != "up":
        raise LaunchError(f"{where} is {part.state}, not up: choose another with --partition")
    if cfg.nodes > part.nodes:
        raise LaunchError(
            f"--nodes {cfg.nodes}: {where} has only {part.nodes} node(s); ask for at most "
            f"{part.nodes} or choose another partition"
        )
    if cfg.gpus_per_node > part.gpus_per_node:
        fix = (
            "it has no GPUs: pass --gpus-per-node 0 and --tasks-per-node N for a CPU-only job"
            if part.gpus_per_node == 0
            else f"its nodes have {part.gpus_per_node}: ask for at most that many"
        )
        raise LaunchError(f"--gpus-per-node {cfg.gpus_per_node} on {where}: {fix}")
    cpus = tasks_per_node(cfg) * cfg.cpus_per_task
    if part.cpus_per_node and cpus > part.cpus_per_node:
        raise LaunchError(
            f"{tasks_per_node(cfg)} tasks x {cfg.cpus_per_task} CPUs per task = {cpus} CPUs per "
            f"node, but the nodes of {where} have {part.cpus_per_node}: lower --cpus-per-task "
            "or --tasks-per-node"
        )
    return part
