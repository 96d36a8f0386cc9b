"""The command every task of a submitted job runs: submitit's job runner, ended cleanly.

submitit starts ``<python> -u -m submitit.core._submit <folder>`` in each task (``srun``
or, with ``--local``, its own process). :func:`launch.slurm.make_executor` sets ``<python>``
to :data:`PYTHON`, so the task runs ``<interpreter> -u -m launch.task -u -m
submitit.core._submit <folder>``: this module runs the same job (``process_job``: load the
pickled call, run it, write its result or error, requeue on a timeout) and then ends the
process through ``pipeline.distributed.group.exit_process``, as the ``pipeline`` command does. A
task that trained or evaluated in a gloo group could otherwise abort in the interpreter's
teardown after its result was written (see ``exit_process``); the job's exit code would
then say "aborted" instead of what happened.
"""

from __future__ import annotations

import shlex
import sys
from typing import NoReturn

from submitit.core.submission import process_job

from pipeline.cli import end, exit_code

# The "python" submitit puts in front of "-u -m submitit.core._submit <folder>".
PYTHON = f"{shlex.quote(sys.executable)} -u -m launch.task"
EXPECTED = ["-u", "-m", "submitit.core._submit"]


def main(argv: list[str]) -> NoReturn:
    if len(argv) != len(EXPECTED) + 1 or argv[:-1] != EXPECTED:
        sys.exit(
            f"launch.task: arguments {argv!r}: expected {' '.join(EXPECTED)} <job folder>, "
            "the command submitit builds around launch.task.PYTHON; submit jobs with "
            "python -m launch.slurm"
        )

    end(exit_code(lambda: process_job(argv[-1])))


if __name__ == "__main__":
    main(sys.argv[1:])
