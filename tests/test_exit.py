"""How a process that used a process group ends (pipeline.distributed.group.exit_process).

A gloo worker thread releases a finished collective's tensors after the collective has
returned to Python, and that release takes the GIL. During the interpreter's teardown,
CPython ends such a thread with pthread_exit; the unwinding reaches a C++ destructor and
std::terminate aborts the process: "terminate called without an active exception", exit -6
of a rank that had finished. It failed 1 full test run in 2 (and the CI run of stop 13).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import cli
from tests.dist_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]

# Two gloo ranks. Rank 0 starts an all-reduce and drops its handle and tensor at once: the
# worker thread holds the last reference. Rank 1 joins the all-reduce only then, while rank 0
# keeps the GIL (a long switch interval, busy loops that never block): rank 0's worker
# completes the all-reduce and waits for the GIL to release the tensor. Rank 0 then ends. With
# a plain exit, an object torn down with __main__ releases the GIL, as torch's and DeepSpeed's
# C++ objects do when the teardown frees them: the waiting worker takes it from a finalizing
# interpreter. The group stays referenced to the end, as DeepSpeed keeps its groups.
SCENARIO = textwrap.dedent(
    """
    import mmap, sys, time
    import torch, torch.distributed as dist

    rank, port, flag_file, how = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    world = dist.group.WORLD
    with open(flag_file, "r+b") as f:
        flag = mmap.mmap(f.fileno(), 2)  # reading it never releases the GIL

    class ReleasesTheGilInTeardown:
        def __del__(self, sleep=time.sleep):
            sleep(0.05)

    dist.all_reduce(torch.ones(10))
    if rank == 1:
        while flag[1] == 0:
            time.sleep(0.01)
        dist.all_reduce(torch.ones(10))
        flag[0] = 1
        time.sleep(1.0)
        sys.exit(0)
    sys.setswitchinterval(30.0)
    dist.all_reduce(torch.ones(10), async_op=True)
    flag[1] = 1  # rank 1 may join the all-reduce now
    while flag[0] == 0:  # rank 1 is done: rank 0's worker completes in milliseconds
        pass
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        pass
    if how == "exit_process":
        from pipeline.distributed.group import exit_process
        exit_process(0)
    held = ReleasesTheGilInTeardown()
    sys.exit(0)
    """
)


def _two_ranks(tmp_path: Path, how: str) -> list[subprocess.CompletedProcess]:
    script, flag = tmp_path / "scenario.py", tmp_path / f"flag_{how}"
    script.write_text(SCENARIO)
    flag.write_bytes(b"\0\0")
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), port, str(flag), how],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_a_gloo_thread_aborts_a_plain_exit_but_not_exit_process(tmp_path):
    """The same two ranks, ended by ``sys.exit(0)`` and by ``exit_process(0)``: the first
    aborts rank 0 (SIGABRT, "terminate called without an active exception"), the second exits 0 on both ranks.
    Measured over 27 runs of this test (10 of them beside two CPU burners; the last 5 with
    the 1 s margin rank 0 now waits): every plain exit aborted and no exit_process run did;
    7-17 s."""
    plain = _two_ranks(tmp_path, "plain")
    assert plain[0].returncode == -signal.SIGABRT, plain[0].stderr[-2000:]
    assert "terminate called without an active exception" in plain[0].stderr

    fixed = _two_ranks(tmp_path, "exit_process")
    assert [r.returncode for r in fixed] == [0, 0], [r.stderr[-2000:] for r in fixed]


EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, logging, sys, threading, time
    from pipeline.distributed import group

    logging.basicConfig(filename=sys.argv[1], level=logging.INFO)

    class TornDown:
        def __del__(self):
            print("teardown ran", flush=True)

    kept = TornDown()
    atexit.register(lambda: print("atexit ran"))
    done = []
    threading.Thread(target=lambda: (time.sleep(0.3), done.append(1))).start()
    atexit.register(lambda: print("thread joined before atexit:", bool(done)))
    logging.getLogger("x").info("logged")
    sys.stdout.write("buffered, no newline")
    group.exit_process(int(sys.argv[2]))
    """
)


def test_exit_process_exits_as_python_does_minus_the_teardown(tmp_path):
    """The code is kept; non-daemon threads are joined and atexit functions run (in Python's
    order); buffered output and log files are flushed; objects are not torn down."""
    log = tmp_path / "run.log"
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(log), "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.startswith("buffered, no newline")
    assert "thread joined before atexit: True" in proc.stdout
    assert "atexit ran" in proc.stdout
    assert "teardown ran" not in proc.stdout
    assert "logged" in log.read_text()


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (lambda: 0, 0),
        (lambda: None, 0),
        (lambda: 2, 2),
        (lambda: sys.exit(143), 143),
        (lambda: sys.exit(), 0),
        (lambda: sys.exit("a message"), 1),
        (lambda: 1 / 0, 1),
    ],
)
def test_exit_code_is_what_python_would_exit_with(outcome, code, capsys):
    assert cli.exit_code(outcome) == code


def test_exit_code_prints_what_python_would_print(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert cli.exit_code(interrupted) == 130
    assert "KeyboardInterrupt" in capsys.readouterr().err
    cli.exit_code(lambda: 1 / 0)
    assert "ZeroDivisionError: division by zero" in capsys.readouterr().err
    cli.exit_code(lambda: sys.exit("a message"))
    assert capsys.readouterr().err == "a message\n"


def test_a_rank_ends_through_exit_process(tmp_path, monkeypatch):
    """``pipeline`` (and ``python -m pipeline.cli``) end through exit_process once the
    collectives are loaded; submitted tasks run launch.task, which does the same."""
    import submitit

    from launch.slurm import make_executor
    from launch.task import PYTHON
    from pipeline.config.schema_services import LaunchConfig

    calls = []
    monkeypatch.setattr("pipeline.distributed.group.exit_process", calls.append)
    cli.end(5)
    assert calls == [5]

    executor = make_executor(LaunchConfig(folder=str(tmp_path)), local=True, name="x")
    assert isinstance(executor, submitit.AutoExecutor)
    assert executor._executor.python == PYTHON
    assert PYTHON.endswith(" -u -m launch.task")


def test_launch_task_refuses_other_arguments_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.task", "job_folder"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "expected -u -m submitit.core._submit <job folder>" in lines[0]
