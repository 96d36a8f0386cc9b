"""Drive the multi-host test cluster (start_cluster.sh / stop_cluster.sh) from the tests.

``NamespaceCluster(hosts).ensure()`` starts the cluster when it is not answering with that many
hosts and remembers that it did, so that ``close()`` stops only a cluster this process started
(a cluster started by hand is used and left running; only this process's jobs are cancelled).
Every client command gets the cluster's SLURM_CONF explicitly: the process environment is never
changed, so the one-host cluster of tests/slurm can be used in the same session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.slurm.local_cluster import wait_state

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
START_SCRIPT = HERE / "start_cluster.sh"
STOP_SCRIPT = HERE / "stop_cluster.sh"
PARTITION = "debug"
# Jobs submitted through this module carry this name, so that they, and only they, are
# cancelled when a test ends early on a cluster it did not start.
JOB_NAME = "smoothap-multinode-test"


def state_dir() -> Path:
    return Path(os.environ.get("SMOOTHAP_CLUSTER_DIR", "/tmp/smoothap-cluster"))


def host_name(i: int) -> str:
    """The name (and network namespace) of host ``i`` (0-based), as start_cluster.sh makes it."""
    return f"sapnode{i + 1}"


class NamespaceCluster:
    """``hosts`` Slurm hosts in network namespaces on this machine; ``conf`` is its SLURM_CONF."""

    def __init__(self, hosts: int = 2) -> None:
        self.hosts = hosts
        self.names = [host_name(i) for i in range(hosts)]
        self.conf = state_dir() / "etc" / "slurm.conf"
        self.started_here = False

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment with the cluster's SLURM_CONF, and the repository first
        on PYTHONPATH so that jobs import this checkout of ``pipeline`` on every host."""
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "SLURM_CONF": str(self.conf), "PYTHONPATH": path, **extra}

    def answering(self) -> bool:
        """The controller answers and exactly this cluster's hosts are up (nothing is started)."""
        if not self.conf.is_file():
            return False
        try:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T"],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        up = ("idle", "mixed", "allocated", "completing")
        return (
            out.returncode == 0
            and sorted(states) == sorted(self.names)
            and all(s.rstrip("*~#") in up for s in states.values())
        )

    def ensure(self, timeout_s: float = 300.0) -> None:
        """Start the cluster unless it already answers with these hosts."""
        if self.answering():
            return
        if os.geteuid() != 0:
            raise PermissionError(
                f"the test cluster is not running and starting it needs root: run "
                f"`sudo {START_SCRIPT} {self.hosts}` first"
            )
        # Record before running: a half-started cluster must still be stopped; but a
        # controller that already runs (a cluster of another size, started by hand) is
        # someone else's, and start_cluster.sh refuses to resize it.
        self.started_here = not _controller_alive()
        proc = subprocess.run(
            ["bash", str(START_SCRIPT), str(self.hosts)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{START_SCRIPT} {self.hosts} failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )

    def close(self) -> None:
        """Cancel this module's jobs; stop the cluster if ``ensure`` started it."""
        if self.started_here:
            subprocess.run(["bash", str(STOP_SCRIPT)], capture_output=True, text=True, timeout=180)
            self.started_here = False
        elif self.conf.is_file():
            subprocess.run(
                ["scancel", "-n", JOB_NAME], env=self.env(), capture_output=True, timeout=30
            )

    def srun(
        self, args: list[str], command: list[str], timeout_s: float, **env: str
    ) -> subprocess.CompletedProcess:
        """``srun ARGS COMMAND`` from the head, waiting at most ``timeout_s``.

        The job also gets a Slurm time limit just above ``timeout_s``, so Slurm itself ends it
        if this process is killed; on a local timeout the job is cancelled before raising.
        """
        limit_min = max(1, int(timeout_s // 60) + 1)
        full = ["srun", "-J", JOB_NAME, f"--time={limit_min}", "--kill-on-bad-exit=1", *args]
        proc = subprocess.Popen(
            [*full, *command],
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.cancel_jobs()
            proc.kill()
            out, err = proc.communicate()
            raise TimeoutError(
                f"srun {' '.join(args)} {' '.join(command)} ran over {timeout_s:.0f} s:\n"
                f"{out[-2000:]}\n{err[-2000:]}"
            ) from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def sbatch(self, args: list[str], script: str, **env: str) -> str:
        """Submit ``script`` (its text) with ``sbatch ARGS``; returns the job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", "-J", JOB_NAME, *args],
            input=script,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=True,
        )
        return out.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout_s: float) -> str:
        """The job's final (sacct) state; cancels it when it has not ended in ``timeout_s``."""
        try:
            return wait_state(job_id, ("COMPLETED",), timeout_s, env=self.env())
        except TimeoutError:
            subprocess.run(["scancel", job_id], env=self.env(), capture_output=True, timeout=30)
            raise

    def cancel_jobs(self) -> None:
        subprocess.run(["scancel", "-n", JOB_NAME], env=self.env(), capture_output=True, timeout=30)

    def log_tail(self, name: str, lines: int = 40) -> str:
        """The end of a daemon's log (slurmctld, slurmdbd, slurmd-sapnode1, ...)."""
        path = state_dir() / "log" / f"{name}.log"
        if not path.is_file():
            return f"({path} does not exist)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _controller_alive() -> bool:
    """The pid recorded by start_cluster.sh is a live slurmctld."""
    try:
        pid = (state_dir() / "run" / "slurmctld.pid").read_text().strip()
        return Path(f"/proc/{int(pid)}/comm").read_text().strip() == "slurmctld"
    except (OSError, ValueError):
        return False


def python() -> str:
    """The interpreter the jobs run: this one (the disk is shared by all hosts)."""
    return sys.executable
