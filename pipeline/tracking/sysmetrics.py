"""Per-host system metrics (CPU, memory, disk, network, GPU where present) into the MLflow run.

One sampler per host: the rank with LOCAL_RANK 0 of each host runs MLflow's own
``SystemMetricsMonitor`` (a daemon thread) with the host's name as its node id, so every host's
metrics land in the one run of the job under ``system/<host>/<metric>``, e.g.
``system/node7/cpu_utilization_percentage``, ``system/node7/system_memory_usage_megabytes``,
``system/node7/gpu_0_utilization_percentage``. Other ranks hold a do-nothing handle, decided
once here, so that the training loop has no rank branches.

Steps: MLflow numbers system-metric records 0, 1, 2, ... per host (one record per
``interval_s``), not by training step; the record's timestamp places it on the run's timeline.
A record is logged after each full interval, so a sampler stopped before its first interval
ends logs nothing.

Never stops training: MLflow's monitor catches its own logging errors (a sampler whose run or
server is gone ends quietly), and :func:`start` returns a do-nothing handle when the monitor
cannot be created.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

log = logging.getLogger(__name__)


class HostMetrics:
    """A running sampler (or nothing); :meth:`stop` flushes what it collected. Idempotent."""

    def __init__(self, monitor: Any = None, node_id: str = "") -> None:
        self._monitor = monitor
        self.node_id = node_id

    @property
    def active(self) -> bool:
        return self._monitor is not None

    def stop(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()  # joins the thread, then logs the records still queued

    def __enter__(self) -> HostMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    run_id: str | None,
    *,
    tracking_uri: str,
    local_rank: int,
    interval_s: float = 10.0,
    host: str | None = None,
) -> HostMetrics:
    """Start this host's sampler when ``local_rank == 0`` and there is a run to log into.

    ``run_id``: the job's MLflow run, the same on every rank (ranks without a tracker must be
    given it, e.g. broadcast from rank 0); None or '' disables. ``tracking_uri``: that run's
    store (an ``http://`` server when hosts do not share a SQLite file safely). ``host``: the
    node id in the metric names, default this machine's host name. ``interval_s`` <= 0
    disables. Returns a handle to :meth:`HostMetrics.stop` before the run ends.
    """
    if not run_id or local_rank != 0 or interval_s <= 0:
        return HostMetrics()
    node_id = host or socket.gethostname()
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=interval_s,
            samples_before_logging=1,
            node_id=node_id,
            tracking_uri=tracking_uri,
        )
        monitor.start()
    except Exception as e:  # metrics are optional; training goes on without them
        log.warning("system metrics of %s are not logged: %s: %s", node_id, type(e).__name__, e)
        return HostMetrics()
    return HostMetrics(monitor, node_id)
