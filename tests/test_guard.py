"""Signals, the run lock and the launcher's death (pipeline.train.signals, pipeline.train.runlock): real signals, real
processes, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.rundir import RunDir
from pipeline.train.runlock import RunLock, RunLockError
from pipeline.train.signals import StopRequest, exit_with_parent


def test_stop_request_records_the_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(grace_s=60) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before


def _run(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        **kw,
    )


def test_a_stop_that_does_not_finish_exits_after_the_grace_period():
    proc = _run(
        """
        import os, signal, time
        from pipeline.train.signals import StopRequest
        with StopRequest(grace_s=1.0) as stop:
            print("ready", flush=True)
            while True:   # a step blocked forever (a collective with a lost rank)
                time.sleep(0.05)
        """
    )
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 15


def test_a_second_signal_exits_at_once():
    proc = _run(
        """
        import time
        from pipeline.train.signals import StopRequest
        with StopRequest(grace_s=600) as stop:
            print("ready", flush=True)
            while True:
                time.sleep(0.05)
        """
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 128 + signal.SIGUSR1


def test_a_rank_exits_when_its_launcher_dies(tmp_path):
    """The 'launcher' starts a 'rank' in its own session (as torchrun does) and is killed."""
    pid_file = tmp_path / "child.pid"
    launcher = _run(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", '''
        import os, time
        from pipeline.train.signals import exit_with_parent
        assert exit_with_parent()
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(120)
        '''], start_new_session=True)
        time.sleep(120)
        """
    )
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the rank did not start"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the rank kept running after its launcher died")


def test_exit_with_parent_returns_true_on_linux():
    assert exit_with_parent(signal.SIGTERM) is (sys.platform == "linux")
    # Undo it for the test process (0 = no signal).
    if sys.platform == "linux":
        import ctypes
        import ctypes.util

        ctypes.CDLL(ctypes.util.find_library("c")).prctl(1, 0, 0, 0, 0)


def test_run_lock_refuses_a_second_job_and_is_released(tmp_path):
    with RunLock(tmp_path) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(
            RunLockError, match=rf"in use by another training job .*pid {os.getpid()}"
        ):
            RunLock(tmp_path).acquire()
    assert not (RunDir(tmp_path).lock).exists()
    RunLock(tmp_path).acquire().release()


def test_run_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = RunLock(tmp_path)
    lock.path.write_text(json.dumps({"host": lock.host, "pid": dead.pid, "started": 0}))
    with caplog.at_level("WARNING", logger="pipeline.train.runlock"), lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"process {dead.pid}" in caplog.text and "stale lock" in caplog.text


def test_run_lock_of_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path):
    lock = RunLock(tmp_path, stale_after_s=60)
    lock.path.write_text(json.dumps({"host": "node-that-died", "pid": 1, "started": 0}))
    with pytest.raises(RunLockError, match="host node-that-died, pid 1"):
        lock.acquire()
    old = time.time() - 120
    os.utime(lock.path, (old, old))
    with lock:
        assert json.loads(lock.path.read_text())["host"] == lock.host


def test_run_lock_heartbeat_refreshes_the_file(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.1) as lock:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        deadline = time.monotonic() + 10
        while time.time() - lock.path.stat().st_mtime > 100:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
