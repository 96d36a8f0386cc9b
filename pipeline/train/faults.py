"""A lost rank or host during training: the timeout each step's collectives run under, and the
error that names what was lost.

Two timeouts, as torchtitan uses them: ``train.collective_timeout_s`` (long) for start-up, the
first steps and everything slow on the main rank while the others wait in a collective
(evaluation, checkpoints, the final export: pipeline.train.hooks switches around them), and
``train.step_timeout_s`` (short) for the steady steps, so that the survivors of a lost host
stop within about that long instead of the long timeout.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config.schema_train import TrainConfig
from pipeline.distributed import group
from pipeline.weights import latest_tag


def set_step_timeout(train: TrainConfig, step: int, first_step: int, steps_per_epoch: int) -> None:
    """Switch to the timeout of the step about to run, the same on every rank (no
    collective): the long one for the first ``train.step_timeout_after`` steps of this process
    and of each epoch (memory allocated, a new data loader's workers filling their buffers),
    ``train.step_timeout_s`` after them."""
    after = train.step_timeout_after
    warm_up = step - first_step < after or step % steps_per_epoch < after
    group.set_timeout(None if warm_up else train.step_timeout_s)


def lost_rank_error(
    error: Exception, step: int, rank: int, hosts: dict[str, list[int]], checkpoints: Path
) -> RuntimeError:
    """The error a rank ends with when a collective failed: the step, the timeout that ran
    out, the hosts -> ranks table and the checkpoint the same command resumes from."""
    table = ", ".join(f"{h}: ranks {r}" for h, r in hosts.items())
    tag = latest_tag(checkpoints)
    # The timeout that ran out: the step's, or the long one of start-up and slow hooks.
    timeout = group.timeout_s()
    key = "collective_timeout_s" if timeout == group.long_timeout_s() else "step_timeout_s"
    return RuntimeError(
        f"a collective failed at step {step} (rank {rank}; train.{key}={timeout:g}): "
        f"{str(error).strip().splitlines()[-1]}; the job's hosts were {table}: a rank "
        f"or host was lost. Requeue or rerun the same command: it resumes from "
        f"{tag or 'the start'} in the same MLflow run"
    )
