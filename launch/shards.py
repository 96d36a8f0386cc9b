"""Submit ``pipeline make-shards`` as one Slurm job array of N parts and a merge job.

    python -m launch.shards --cluster mycluster --cpus-per-task 16 --time 240 -- \\
        vggface2 --root /data/vggface2 --out /data/shards --resize 256 --tasks 64

Everything after ``--`` is the make-shards command line, with ``--tasks N``. Array element I runs
``pipeline make-shards ARGS --task I``; the merge job (``ARGS --merge``) starts when every
element has ended, whatever its state (``afterany``), so that it reports, one line each, the
parts that failed or were cancelled instead of pending forever behind them. A failed part is
re-run alone with ``--only I`` (the same command otherwise), which submits part I and a new
merge after it; the printed commands say exactly that. The make-shards arguments, the dataset's
listing and the cluster request are all checked before anything is submitted. Each part decodes
with ``--workers`` = ``--cpus-per-task`` unless ``--workers`` is given.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from launch.cluster import LaunchError, check_against_cluster
from launch.shard_jobs import MakeShardsTask
from launch.slurm import FLAG_FIELDS, _at_least, make_executor, resolve_config
from pipeline.config.load import DEFAULTS_PATH
from pipeline.data import make_shards
from pipeline.errors import UserError

ARRAY_ONLY = ("--task", "--merge")


@dataclass
class ArraySubmission:
    """The submitted array elements, the merge job and the commands to print."""

    tasks: int
    parts: list[int]
    jobs: list[Any]  # one submitit job per part, then the merge job
    rerun: str  # the launcher command for one part, with {i} for its number
    by_hand: str  # the same as two plain commands
    notes: list[str] = field(default_factory=list)

    @property
    def merge(self) -> Any:
        return self.jobs[-1]


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, make-shards arguments) around the first ``--``."""
    argv = list(argv)
    if "--" not in argv:
        raise LaunchError(
            "give the make-shards command after --, e.g. python -m launch.shards --cluster C -- "
            "vggface2 --root R --out O --tasks 8"
        )
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


class _ShardParser(argparse.ArgumentParser):
    """make-shards' parser, whose errors are LaunchErrors (one line, nothing submitted)."""

    def error(self, message: str):
        raise LaunchError(f"make-shards arguments: {message}")


def check_shard_args(shard_argv: list[str], cpus_per_task: int) -> tuple[list[str], Any]:
    """The make-shards arguments the jobs run (``--workers`` added when absent) and their parsed
    form; raises LaunchError (argument) or a UserError (bad value, root, output, listing) before
    anything is submitted. Prints the parts."""
    given = [a.split("=")[0] for a in shard_argv]
    for flag in ARRAY_ONLY:
        if flag in given:
            raise LaunchError(
                f"{flag} in the make-shards arguments: the launcher adds --task I to each array "
                "element and --merge to the merge job; give --tasks N only"
            )
    if "--workers" not in given:
        shard_argv = [*shard_argv, "--workers", str(cpus_per_task)]
    parser = _ShardParser(prog="pipeline make-shards")
    make_shards.add_arguments(parser)
    args = parser.parse_args(shard_argv)
    if args.tasks < 1:
        raise LaunchError("the make-shards arguments need --tasks N (N >= 1): the array's size")
    make_shards.run(args)  # --tasks alone: every check make-shards makes, then the plan
    return shard_argv, args


def parse_only(text: str | None, tasks: int) -> list[int]:
    """``--only 3,7``: those parts; absent: all of them."""
    if text is None:
        return list(range(tasks))
    try:
        chosen = sorted({int(t) for t in text.split(",")})
    except ValueError:
        chosen = [-1]
    if not chosen or not all(0 <= t < tasks for t in chosen):
        raise LaunchError(f"--only {text}: give part numbers in 0..{tasks - 1}, e.g. --only 2,5")
    return chosen


def submit(argv: Sequence[str]) -> ArraySubmission:
    """Check everything, then submit the array and its merge job (see the module docstring)."""
    launcher_argv, shard_argv = split_argv(argv)
    opts = build_parser().parse_args(launcher_argv)
    flags = {name: getattr(opts, name, None) for name in FLAG_FIELDS}
    cfg = resolve_config(DEFAULTS_PATH, cluster=opts.cluster, flags=flags)
    # One process per part; its decoding pool uses the task's CPUs.
    launch = replace(cfg.launch, nodes=1, gpus_per_node=0, tasks_per_node=1)
    shard_argv, args = check_shard_args(shard_argv, launch.cpus_per_task)
    chosen = parse_only(opts.only, args.tasks)
    check_against_cluster(launch)

    executor = make_executor(launch, local=False, name="make-shards")
    with executor.batch():  # one Slurm job array
        jobs = [executor.submit(MakeShardsTask([*shard_argv, "--task", str(i)])) for i in chosen]
    array_id = str(jobs[0].job_id).split("_")[0]
    merge = make_executor(launch, local=False, name="make-shards-merge")
    # afterany: the merge also runs when a part failed or was cancelled, and names it.
    merge.update_parameters(slurm_dependency=f"afterany:{array_id}")
    jobs.append(merge.submit(MakeShardsTask([*shard_argv, "--merge"])))

    launcher = shlex.join([sys.executable, "-m", "launch.shards", *without_only(launcher_argv)])
    shards = shlex.join(shard_argv)
    return ArraySubmission(
        tasks=args.tasks,
        parts=chosen,
        jobs=jobs,
        rerun=f"{launcher} --only {{i}} -- {shards}",
        by_hand=f"pipeline make-shards {shards} --task {{i}} && pipeline make-shards {shards} --merge",
    )


def without_only(launcher_argv: list[str]) -> list[str]:
    """The launcher arguments without ``--only``, to build the re-run of one part."""
    kept, skip = [], False
    for arg in launcher_argv:
        if not skip and arg != "--only" and not arg.startswith("--only="):
            kept.append(arg)
        skip = arg == "--only"
    return kept


def describe(sub: ArraySubmission) -> str:
    """What to print after submitting: the jobs, their logs, and how to re-run a part."""
    array = str(sub.jobs[0].job_id).split("_")[0]
    which = "all" if len(sub.parts) == sub.tasks else ", ".join(map(str, sub.parts))
    return "\n".join(
        [
            f"submitted make-shards array job {array}: parts {which} of {sub.tasks}",
            f"  merge job {sub.merge.job_id}: starts when every part has ended (afterany) and "
            "names any part that is missing or failed",
            f"  logs:       {sub.jobs[0].paths.stdout} (part {sub.parts[0]}), merge: "
            f"{sub.merge.paths.stderr}",
            f"  follow:     squeue -j {array},{sub.merge.job_id}",
            "  a part I failed or was cancelled? re-run it alone, then the merge:",
            "    " + sub.rerun.replace("{i}", "I"),
            "  or by hand: " + sub.by_hand.replace("{i}", "I"),
        ]
    )


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
ENDED += ("DEADLINE",)  # a preempted or timed-out part is requeued (submitit), not ended


def final_state(job: Any, poll_s: float = 1.0) -> str:
    """The job's Slurm state once it has ended (asked of Slurm each poll: submitit counts a job
    done when its result file appears, while Slurm may still be ending it)."""
    while True:
        state = (job.get_info(mode="force").get("State") or "UNKNOWN").split()[0]
        if state in ENDED:
            return state
        time.sleep(poll_s)


def wait(sub: ArraySubmission, poll_s: float = 1.0) -> bool:
    """Wait for the merge job; print each failed part's re-run command. True when the split
    was merged."""
    merged = final_state(sub.merge, poll_s)
    for part, job in zip(sub.parts, sub.jobs[:-1]):
        state = final_state(job, poll_s)
        if state != "COMPLETED":
            rerun = sub.rerun.replace("{i}", str(part))
            print(f"part {part}: {state}; re-run it, then the merge: {rerun}")
    print(
        f"merge job {sub.merge.job_id}: {merged}"
        + ("" if merged == "COMPLETED" else f", see {sub.merge.paths.stderr}")
    )
    return merged == "COMPLETED"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.shards",
        description="Run `pipeline make-shards ... --tasks N` as a Slurm job array of N parts "
        "and a merge job. Usage: python -m launch.shards [FLAGS] -- MAKE-SHARDS ARGUMENTS",
    )
    p.add_argument("--cluster", help="site defaults: conf/cluster/NAME.yaml or a YAML path")
    p.add_argument("--cpus-per-task", type=_at_least(1, "CPU cores of each part"))
    p.add_argument("--mem-gb", type=_at_least(0, "0: the partition's default"))
    p.add_argument("--partition")
    p.add_argument("--time", type=_at_least(1, "minutes"), metavar="MINUTES")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--folder", help="submitit folder (logs); %%A is the array id, %%a the part")
    p.add_argument("--only", metavar="I[,J...]", help="submit only these parts (and a merge)")
    p.add_argument("--wait", action="store_true", help="wait for the merge and report")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        sub = submit(argv)
    except (LaunchError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("nothing was submitted", file=sys.stderr)
        return 2
    print(describe(sub), flush=True)
    if build_parser().parse_args(split_argv(argv)[0]).wait:
        return 0 if wait(sub) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
