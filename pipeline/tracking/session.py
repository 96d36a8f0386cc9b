"""A tracked run for the duration of a ``with`` block: the real tracker on the main process,
a null one elsewhere; the run id is recorded in the run directory, and the run ends with the
status the block ended with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config.load import flatten
from pipeline.config.schema_services import TrackingConfig
from pipeline.plots import pyplot, save_png
from pipeline.rundir import RunDir
from pipeline.tracking.base import NullTracker, Tracker
from pipeline.tracking.mlflow import MlflowTracker


def make_tracker(
    tracking_cfg: TrackingConfig, *, is_main: bool, run_id: str | None = None
) -> Tracker:
    """The real MLflow tracker on the main process (if tracking is enabled), else a null one.

    ``run_id``: continue this run instead of creating one (resume).
    """
    if not (is_main and tracking_cfg.enabled):
        return NullTracker()
    return MlflowTracker(tracking_cfg, run_id=run_id)


@contextmanager
def tracking_session(
    tracking_cfg: TrackingConfig,
    *,
    is_main: bool,
    run_dir: str | Path | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Tracker]:
    """A run for the duration of a ``with`` block; yields its tracker.

    On the main process with tracking enabled: continues the run that ``run_dir`` records
    (its ``mlflow_run.txt``, pipeline.rundir: the one source of a training run's MLflow id,
    so that every later job of the run continues it), or creates one and records it there;
    logs ``params`` (nested mappings are flattened: ``{'optim': {'lr': 1}}`` -> ``optim.lr``)
    and ``tags``. Elsewhere the tracker does nothing. The run ends FINISHED when the block
    ends normally, KILLED on KeyboardInterrupt or SystemExit, FAILED on any other exception
    (which propagates).
    """
    run_id = RunDir(run_dir).read_run_id() if run_dir is not None and is_main else None
    tracker = make_tracker(tracking_cfg, is_main=is_main, run_id=run_id)
    status = "FAILED"
    try:
        if run_dir is not None and tracker.run_id and tracker.run_id != run_id:
            RunDir(run_dir).write_run_id(tracker.run_id)
        if params:
            tracker.log_params(flatten(params))
        if tags:
            tracker.set_tags(tags)
        yield tracker
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        # Whatever the store did not take in time goes to the run directory, with the
        # command that uploads it (pipeline.tracking.outbox).
        tracker.finish(status, spool_dir=run_dir)


def log_curves(tracker: Tracker, panels: dict[str, list[str]], path: str | Path) -> Path | None:
    """Plot the stored history of each panel's metrics (one subplot per panel) to a PNG and
    log it as an artifact. Returns the file, or None when nothing was logged."""
    histories = {
        title: {k: tracker.metric_history(k) for k in keys} for title, keys in panels.items()
    }
    histories = {t: {k: h for k, h in hs.items() if h} for t, hs in histories.items()}
    histories = {t: hs for t, hs in histories.items() if hs}
    if not histories:
        return None

    fig, axes = pyplot().subplots(
        1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False
    )
    for ax, (title, series) in zip(axes[0], histories.items()):
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    path = save_png(fig, path, dpi=100)
    tracker.log_artifact(path, "plots")
    return path
