"""Submit training or evaluation to SLURM (or run it locally) with submitit.

    python -m launch.slurm train --config conf/experiments/sop.yaml --nodes 2 \\
        --gpus-per-node 8 --partition gpu --time 240 [key=value ...]
    python -m launch.slurm evaluate --config conf/experiments/vggface2.yaml \\
        --weights runs/vggface2/model.safetensors --parts 32 --gpus-per-node 1
    python -m launch.slurm train --config FILE --local --gpus-per-node 0 --tasks-per-node 2

Resources resolve in this order, later winning: the config's ``launch`` section (defaults.yaml,
then the config file), the cluster file (``--cluster NAME`` -> ``conf/cluster/NAME.yaml``),
``launch.*=...`` overrides, then the flags below. Everything is checked (config keys, partition,
node, GPU and CPU counts against ``sinfo``) before anything is submitted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit

from launch import jobs
from launch.cluster import (
    LaunchError,
    check_against_cluster,
    check_local,
    cluster_overrides,
    tasks_per_node,
)
from launch.evaluation import ExtractPartJob, MergeEvalJob
from launch.task import PYTHON
from pipeline.config.load import split_weights
from pipeline.config.rules import load_checked
from pipeline.config.runconfig import RunConfig
from pipeline.config.schema import ConfigError
from pipeline.config.schema_services import LaunchConfig
from pipeline.eval.destination import evaluation_folder
from pipeline.eval.parts import plan_parts
from pipeline.rundir import EvalDir, eval_output_dir
from pipeline.secrets import strip_uri
from pipeline.tracking.mlflow import resolve_uri, ui_command
from pipeline.weights import resolve_weights_path

# flag -> LaunchConfig field
FLAG_FIELDS = {
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "tasks_per_node": "tasks_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "partition": "partition",
    "time": "time_minutes",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "folder": "folder",
}


@dataclass
class Submission:
    """What was submitted: the jobs, the resolved config, and where to look."""

    command: str
    cfg: RunConfig
    jobs: list[Any]  # submitit jobs (one per submission; array tasks are separate jobs)
    local: bool
    notes: list[str] = field(default_factory=list)

    @property
    def job(self) -> Any:
        return self.jobs[-1]


def layered_overrides(
    overrides: Sequence[str] = (),
    *,
    cluster: str | None = None,
    flags: dict[str, Any] | None = None,
) -> list[str]:
    """Cluster file, then the user's ``key=value`` list, then flags, as one override list."""
    layered = list(cluster_overrides(cluster)) if cluster else []
    layered += list(overrides)
    for name, value in (flags or {}).items():
        if value is not None:
            # JSON is valid YAML: a value with ':' or ',' stays one string.
            layered.append(f"launch.{FLAG_FIELDS[name]}={json.dumps(value)}")
    return layered


def resolve_config(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    cluster: str | None = None,
    flags: dict[str, Any] | None = None,
) -> RunConfig:
    """The run config with the launch section resolved (see the module docstring for order),
    checked by the cross-section rules before anything is submitted."""
    return load_checked(config, layered_overrides(overrides, cluster=cluster, flags=flags))


def weights_and_overrides(weights: str | None, overrides: Sequence[str]) -> tuple[str, list[str]]:
    """``--weights PATH`` (absolute) and the config overrides, as ``pipeline evaluate`` takes
    them; missing or doubled weights are an error before submission."""
    try:
        return split_weights(weights, list(overrides))
    except ConfigError as e:
        raise LaunchError(f"evaluate: {e}") from None


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    # Jobs start in the submission directory, but absolute paths make the printed locations
    # and the saved config unambiguous.

    train = replace(cfg.train, output_dir=str(Path(cfg.train.output_dir).resolve()))
    evaluation = replace(
        cfg.eval, output_dir=str(Path(cfg.eval.output_dir).resolve()) if cfg.eval.output_dir else ""
    )
    # Pin the tracking URI now, so the job logs where this command says it does.
    tracking = replace(cfg.tracking, uri=resolve_uri(cfg.tracking))
    launch = replace(cfg.launch, folder=str(Path(cfg.launch.folder).resolve()))
    return replace(cfg, train=train, eval=evaluation, tracking=tracking, launch=launch)


def make_executor(launch: LaunchConfig, *, local: bool, name: str) -> Any:
    """A submitit AutoExecutor ('slurm' or 'local') with the job's resources."""
    executor = submitit.AutoExecutor(
        folder=launch.folder,
        cluster="local" if local else "slurm",
        slurm_max_num_timeout=launch.max_timeouts,
        local_max_num_timeout=launch.max_timeouts,
        # Each task runs submitit's job runner through launch.task, which ends the process
        # without the interpreter's teardown (a gloo thread can abort a rank there).
        slurm_python=PYTHON,
        local_python=PYTHON,
    )
    params: dict[str, Any] = {
        "name": launch.job_name or name,
        "nodes": launch.nodes,
        "tasks_per_node": tasks_per_node(launch),
        "cpus_per_task": launch.cpus_per_task,
        "gpus_per_node": launch.gpus_per_node or None,
        "mem_gb": launch.mem_gb or None,
        "timeout_min": launch.time_minutes,
    }
    if not local:
        params.update(
            slurm_partition=launch.partition or None,
            slurm_account=launch.account or None,
            slurm_qos=launch.qos or None,
            slurm_constraint=launch.constraint or None,
            slurm_signal_delay_s=launch.signal_delay_s,
            slurm_setup=list(launch.setup) or None,
            # Requeue on preemption and from checkpoint(), also where JobRequeue=0 is the default.
            slurm_additional_parameters={"requeue": True},
        )
    executor.update_parameters(**params)
    if local:
        # AutoExecutor does not pass this through to the local executor, which reads it.
        executor._executor.update_parameters(signal_delay_s=launch.signal_delay_s)
    return executor


def local_folder(folder: str) -> str:
    """``folder`` with submitit's job tags filled in for a local run: submitit's local executor
    creates the folder as named before a job id exists (a literal ``%j`` directory otherwise).
    Logs inside are named by process id, so one folder per launch (its start time) suffices."""
    stamp = time.strftime("local-%Y%m%d-%H%M%S")
    for tag, value in (("%j", stamp), ("%A", stamp), ("%a", "0"), ("%t", "0")):
        folder = folder.replace(tag, value)
    return folder


def prepare(
    command: str,
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    cluster: str | None = None,
    flags: dict[str, Any] | None = None,
    local: bool = False,
) -> RunConfig:
    """Resolve and check everything a submission needs; raises before anything is submitted."""
    if command not in ("train", "evaluate"):
        raise LaunchError(f"unknown command {command!r}: use train or evaluate")
    cfg = _absolute_paths(resolve_config(config, overrides, cluster=cluster, flags=flags))
    if local:
        check_local(cfg.launch)
        cfg = replace(cfg, launch=replace(cfg.launch, folder=local_folder(cfg.launch.folder)))
    else:
        check_against_cluster(cfg.launch)
    return cfg


def submit(
    command: str,
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    cluster: str | None = None,
    flags: dict[str, Any] | None = None,
    local: bool = False,
    parts: int = 0,
    weights: str | None = None,
) -> Submission:
    """Check, then submit ``command`` ('train' or 'evaluate') and return the submission.

    ``evaluate`` takes the trained weights (``weights``; the old ``checkpoint=PATH`` among
    ``overrides`` still works); ``parts`` > 0 splits it into
    an array job over shard ranges and a dependent merge job (``launch.evaluation``).
    """
    if parts < 0:
        raise LaunchError(
            f"--parts {parts}: the number of extraction array tasks must be >= 1 (leave --parts "
            "out for one evaluation job)"
        )
    if parts and command != "evaluate":
        raise LaunchError("--parts splits an evaluation; it does not apply to train")
    checkpoint, overrides = (
        weights_and_overrides(weights, overrides) if command == "evaluate" else ("", overrides)
    )
    cfg = prepare(command, config, overrides, cluster=cluster, flags=flags, local=local)
    if command == "evaluate":  # its own folder, never the training run's evaluation
        out = str(evaluation_folder(cfg, checkpoint).resolve())
        cfg = replace(cfg, eval=replace(cfg.eval, output_dir=out))
    sub = Submission(command, cfg, [], local)
    if command == "train":
        executor = make_executor(cfg.launch, local=local, name="smoothap-train")
        sub.jobs.append(executor.submit(jobs.TrainJob(cfg)))
    elif parts:
        _submit_parts(sub, checkpoint, parts)
    else:
        out = eval_output_dir(cfg)
        # The job runs `pipeline evaluate` itself, with the paths this command resolved.
        pinned = {
            "tracking.uri": cfg.tracking.uri,
            "train.output_dir": cfg.train.output_dir,
            "eval.output_dir": str(out),
        }
        # Pickled for the job: credentials stay in the environment the job inherits.
        job_overrides = [
            *map(strip_uri, layered_overrides(overrides, cluster=cluster, flags=flags)),
            *(f"{k}={json.dumps(v)}" for k, v in pinned.items()),
        ]
        executor = make_executor(cfg.launch, local=local, name="smoothap-evaluate")
        job = executor.submit(
            jobs.EvaluateJob(str(Path(config).resolve()), job_overrides, str(out), checkpoint)
        )
        sub.jobs.append(job)
        sub.notes.append(f"metrics: {EvalDir(out).metrics}")
    if cfg.tracking.enabled and cfg.tracking.uri.startswith("sqlite:") and not local:
        sub.notes.append(
            "MLflow store is a SQLite file: fine for one job on one node, unsafe on NFS/Lustre "
            "with several writers; run `mlflow server` on a login node and set "
            "MLFLOW_TRACKING_URI=http://<login-node>:<port> (README.md: MLflow from compute nodes)"
        )
    return sub


def _submit_parts(sub: Submission, checkpoint: str, parts: int) -> None:
    """The extraction array job, then the merge job that Slurm starts after it succeeded."""
    cfg = sub.cfg
    # A checkpoint root is read at the tag its 'latest' names now: every part and the merge
    # embed and record that one step, even while the run goes on saving.
    checkpoint, root = resolve_weights_path(checkpoint)
    if root:
        sub.notes.append(f"weights: {root} -> {Path(checkpoint).name} (read by every part)")
    try:
        plan = plan_parts(cfg.data.eval_urls, parts)
    except ValueError as e:
        raise LaunchError(f"data.eval_urls={cfg.data.eval_urls!r}: {e}") from e
    executor = make_executor(cfg.launch, local=sub.local, name="smoothap-extract")
    with executor.batch():  # one Slurm array job (separate processes with --local)
        for i, urls in enumerate(plan):
            sub.jobs.append(executor.submit(ExtractPartJob(cfg, checkpoint, i, urls)))
    # The merge runs in one task on one node (with the node's GPUs for FAISS, if any).
    merge_launch = replace(cfg.launch, nodes=1, tasks_per_node=1)
    merge = make_executor(merge_launch, local=sub.local, name="smoothap-merge")
    if sub.local:  # the local executor has no dependencies: wait here
        if not wait(Submission(sub.command, cfg, list(sub.jobs), True), poll_s=1.0):
            raise LaunchError("an extraction part failed (its error is printed above)")
    else:
        array_id = str(sub.jobs[0].job_id).split("_")[0]
        merge.update_parameters(slurm_dependency=f"afterok:{array_id}")
    sub.jobs.append(merge.submit(MergeEvalJob(cfg, checkpoint, plan)))
    out = eval_output_dir(cfg)
    sub.notes.append(
        f"{len(plan)} extraction task(s) write {out}/parts/; job {sub.jobs[-1].job_id} merges "
        f"them into {EvalDir(out).metrics} once all succeeded"
    )


def describe(sub: Submission) -> str:
    """The lines printed after submission: job id, logs, checkpoints, how to follow MLflow."""
    cfg, job = sub.cfg, sub.job
    launch = cfg.launch
    where = "locally" if sub.local else f"to partition {launch.partition or '(default)'}"
    lines = [
        f"submitted {sub.command} job {job.job_id} {where}: {launch.nodes} node(s) x "
        f"{tasks_per_node(launch)} task(s), {launch.gpus_per_node} GPU(s)/node, "
        f"{launch.cpus_per_task} CPU(s)/task, {launch.time_minutes} min",
        f"  job folder:  {job.paths.folder}",
    ]
    tasks = getattr(job, "_sub_jobs", None) or [job]
    for rank, t in enumerate(tasks[:4]):
        lines.append(f"  log rank {rank}:  {t.paths.stdout}")
    if len(tasks) > 4:
        lines.append(f"  ... {len(tasks) - 4} more rank logs in the job folder")
    if len(sub.jobs) > 1:
        parts = sub.jobs[:-1]
        ids = ", ".join(str(j.job_id) for j in parts[:3]) + (", ..." if len(parts) > 3 else "")
        lines.append(f"  extraction:  {len(parts)} task(s) {ids}; log: {parts[0].paths.stdout}")
    if sub.command == "train":
        lines.append(f"  checkpoints: {cfg.train.output_dir}")
    if cfg.tracking.enabled:
        lines.append(
            f"  MLflow:      experiment {cfg.tracking.experiment!r} at {cfg.tracking.uri}; "
            + ui_command(cfg.tracking.uri)
        )
    if not sub.local:
        lines.append(f"  follow:      squeue -j {job.job_id}; tail -f {tasks[0].paths.stdout}")
        lines.append(f"  cancel:      scancel {job.job_id}")
    lines += [f"  note: {n}" for n in sub.notes]
    return "\n".join(lines)


def wait(sub: Submission, poll_s: float = 5.0) -> bool:
    """Wait for every job to end; True when all completed. Forces a state check each poll
    (submitit's own polling interval grows to minutes)."""
    for job in sub.jobs:
        while not job.done(force_check=True):
            time.sleep(poll_s)
    ok = True
    for job in sub.jobs:
        exc = job.exception()
        if exc is not None:
            print(f"job {job.job_id} failed:\n{exc}", file=sys.stderr)
            ok = False
    return ok


def _at_least(minimum: int, meaning: str):
    """An argparse type: an integer >= ``minimum``; the error names the rule (argparse names
    the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"{text!r}: must be an integer >= {minimum} ({meaning})"
            )
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Submit Smooth-AP training or evaluation to SLURM (or run it locally) "
        "with submitit.",
    )
    p.add_argument("command", choices=("train", "evaluate"))
    p.add_argument("--config", required=True, help="run config YAML (as for `pipeline train`)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4")
    p.add_argument(
        "--weights", metavar="PATH", help="evaluate: the trained weights (model.safetensors)"
    )
    p.add_argument("--cluster", help="site defaults: conf/cluster/NAME.yaml or a YAML path")
    p.add_argument("--nodes", type=_at_least(1, "nodes of the job"))
    p.add_argument("--gpus-per-node", type=_at_least(0, "0: a CPU-only job"))
    p.add_argument(
        "--tasks-per-node",
        type=_at_least(0, "0: one per GPU"),
        help="default: one per GPU (set on CPU nodes)",
    )
    p.add_argument("--cpus-per-task", type=_at_least(1, "CPU cores of each task"))
    p.add_argument(
        "--mem-gb", type=_at_least(0, "0: the partition's default"), help="memory per node in GB"
    )
    p.add_argument("--partition")
    p.add_argument(
        "--time", type=_at_least(1, "minutes"), metavar="MINUTES", help="time limit of one job"
    )
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--folder", help="submitit folder (logs per rank); %%j is the job id")
    p.add_argument(
        "--local",
        action="store_true",
        help="run here with submitit's local executor (several tasks, one machine); waits",
    )
    p.add_argument(
        "--parts",
        type=_at_least(1, "extraction array tasks; leave --parts out for one job"),
        default=0,
        metavar="N",
        help="evaluate: an array job of N shard ranges, then a dependent merge job",
    )
    p.add_argument("--wait", action="store_true", help="wait for the job and report its end")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # Intermixed: key=value overrides may come before, between or after the flags.
    args = build_parser().parse_intermixed_args(argv)
    flags = {name: getattr(args, name) for name in FLAG_FIELDS}
    try:
        sub = submit(
            args.command,
            args.config,
            args.overrides,
            cluster=args.cluster,
            flags=flags,
            local=args.local,
            parts=args.parts,
            weights=args.weights,
        )
    except (ConfigError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("nothing was submitted", file=sys.stderr)
        return 2
    print(describe(sub), flush=True)
    if args.local or args.wait:
        ok = wait(sub)
        print(f"{sub.command} job {sub.job.job_id}: {'completed' if ok else 'FAILED'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
