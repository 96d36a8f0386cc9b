"""Start cost of the tests' gloo ranks (tests/dist_helpers.py ``run_distributed``): plain spawn
against a fork server that has imported torch, DeepSpeed, timm and the package's model and
engine modules once.

    PYTHONPATH=$PWD python benchmarks/rank_start.py            # 8 calls of 2 ranks each way
    PYTHONPATH=$PWD python benchmarks/rank_start.py --calls 4 --world 2

Each method runs in its own process, which makes ``--calls`` calls of ``run_distributed``; a
rank imports what the distributed tests' ranks import (pipeline.model, pipeline.train.engine,
DeepSpeed), builds the tiny model and does one all-reduce, so that the figures are a rank's
start, not its work. The fork server's one start is inside its method's figures. Printed: wall
time and CPU time of the method's whole process tree (a cpuacct cgroup when this runs as root
on cgroup v1; otherwise CPU is not printed, since RUSAGE_CHILDREN misses the fork server's
ranks), per call, and the spawn / fork-server ratios.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/cpuacct")


def _rank(rank: int, world_size: int) -> None:
    import torch

    from pipeline import model as models
    from pipeline.distributed import collectives
    from pipeline.train import engine  # noqa: F401 (imported as the training tests' ranks do)
    from tests.tiny import tiny_model_config

    models.build_model(tiny_model_config())
    total = collectives.all_reduce_sum(torch.tensor([float(rank + 1)]))
    assert total.item() == world_size * (world_size + 1) / 2


def _child(calls: int, world: int, cgroup: str | None) -> None:
    if cgroup:
        (Path(cgroup) / "cgroup.procs").write_text(str(os.getpid()))
    from tests.dist_helpers import run_distributed

    for _ in range(calls):
        run_distributed(_rank, world)


def _cgroup(name: str) -> Path | None:
    path = CGROUP_ROOT / f"rank_start_{name}_{os.getpid()}"
    try:
        path.mkdir()
    except OSError:
        return None
    return path


def _measure(method: str, calls: int, world: int) -> tuple[float, float | None]:
    cgroup = _cgroup(method)
    env = {**os.environ, "SMOOTHAP_TEST_START_METHOD": method}
    command = [sys.executable, __file__, "--child", "--calls", str(calls), "--world", str(world)]
    if cgroup:
        command += ["--cgroup", str(cgroup)]
    t0 = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    wall = time.perf_counter() - t0
    if cgroup is None:
        return wall, None
    deadline = time.time() + 30  # the fork server ends once its parent has gone
    while (cgroup / "cgroup.procs").read_text().strip() and time.time() < deadline:
        time.sleep(0.1)
    cpu = int((cgroup / "cpuacct.usage").read_text()) / 1e9
    cgroup.rmdir()
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cgroup", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.calls, args.world, args.cgroup)
        return
    load = os.getloadavg()[0]
    results = {m: _measure(m, args.calls, args.world) for m in ("spawn", "forkserver")}
    print(f"{args.calls} calls x {args.world} ranks; load average at start {load:.1f}")
    for method, (wall, cpu) in results.items():
        line = f"{method:>10}: {wall / args.calls:6.2f} s wall per call"
        if cpu is not None:
            line += f", {cpu / args.calls:6.2f} CPU-s per call"
        print(line)
    (sw, sc), (fw, fc) = results["spawn"], results["forkserver"]
    ratio = f"spawn / fork server: wall {sw / fw:.2f}x"
    if sc is not None and fc is not None:
        ratio += f", CPU {sc / fc:.2f}x"
    print(ratio)


if __name__ == "__main__":
    main()
