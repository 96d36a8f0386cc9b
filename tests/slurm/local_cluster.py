"""Drive the local test Slurm (start_local_slurm.sh / stop_local_slurm.sh) from the tests.

``LocalSlurm.ensure()`` starts the cluster when it is not answering and remembers that it did,
so that ``close()`` stops only a cluster this process started. Job-state helpers force a
``sacct`` call on every poll: submitit's own polling interval grows to minutes.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
START_SCRIPT = HERE / "start_local_slurm.sh"
STOP_SCRIPT = HERE / "stop_local_slurm.sh"
PARTITION = "debug"

# Slurm states after which a job will not run again (a requeued job passes through
# PENDING/REQUEUED, never through these).
TERMINAL_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
)


def state_dir() -> Path:
    return Path(os.environ.get("SMOOTHAP_SLURM_DIR", "/tmp/smoothap-slurm"))


class LocalSlurm:
    """The one-node cluster of this host; ``conf`` is the SLURM_CONF clients must use."""

    def __init__(self) -> None:
        self.conf = state_dir() / "etc" / "slurm.conf"
        self.started_here = False
        self._saved_conf: str | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def answering(self) -> bool:
        """The controller answers and the node is up (nothing is started)."""
        if not self.conf.is_file():
            return False
        try:
            out = subprocess.run(
                ["sinfo", "-h", "-p", PARTITION, "-o", "%T"],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        states = out.stdout.split()
        return out.returncode == 0 and any(
            s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states
        )

    def ensure(self, timeout_s: float = 280.0) -> None:
        """Start the cluster if it is not answering; export SLURM_CONF for this process."""
        if not self.answering():
            if os.geteuid() != 0:
                raise PermissionError(
                    f"the local Slurm is not running and starting it needs root: run "
                    f"`sudo {START_SCRIPT}` first"
                )
            proc = subprocess.run(
                ["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=timeout_s
            )
            # Record before checking: a half-started cluster must still be stopped.
            self.started_here = True
            if proc.returncode != 0:
                raise RuntimeError(
                    f"{START_SCRIPT} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                )
        self._saved_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)

    def close(self) -> None:
        """Stop the cluster if ``ensure`` started it; restore SLURM_CONF."""
        if self._saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._saved_conf
        if self.started_here:
            subprocess.run(["bash", str(STOP_SCRIPT)], capture_output=True, text=True, timeout=120)
            self.started_here = False


def job_state(job_id: str, env: dict[str, str] | None = None) -> str:
    """The job's state from ``sacct`` now ('' when sacct does not know it yet); ``env``
    (SLURM_CONF) names the cluster, this process's environment by default."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    lines = [x for x in out.stdout.splitlines() if x.strip()]
    # "CANCELLED by 0" -> "CANCELLED"
    return lines[-1].split()[0] if lines else ""


def wait_state(
    job_id: str, wanted: tuple[str, ...], timeout_s: float, env: dict[str, str] | None = None
) -> str:
    """Poll sacct every 0.5 s until the job is in one of ``wanted`` (or a terminal state)."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = job_state(job_id, env)
        if state in wanted or state in TERMINAL_STATES:
            return state
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {state or 'unknown'} after {timeout_s:.0f} s")


def slurm_log_tail(name: str, lines: int = 40) -> str:
    """The end of a daemon's log (slurmctld, slurmd, slurmdbd), for failure messages."""
    path = state_dir() / "log" / f"{name}.log"
    if not path.is_file():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
