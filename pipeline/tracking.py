"""MLflow on rank 0, a do-nothing tracker on every other rank.

The choice is made once, at setup (:func:`tracking_session`, or :func:`make_tracker` for a
bare tracker), so the training loop calls the tracker unconditionally. A session also starts
or continues the run, logs the flattened config and tags, records the run id in the run
directory and ends the run with the status the block ended with (FINISHED, KILLED, FAILED). The real tracker talks to MLflow through an explicit
``MlflowClient`` (no global active run), so a library caller's own MLflow state is untouched.

Resuming: given the id of an existing run, the tracker continues that run, and a metric is
never logged twice at the same step. A run killed after logging step 17 but checkpointed at
step 12 recomputes steps 13-17 on resume; those (key, step) pairs are already in the store and
are skipped, so every step appears once in the run's history.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import TrackingConfig

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"

# MLflow accepts alphanumerics, '_', '-', '.', ' ', ':' and '/' in metric and param names.
_INVALID_KEY_CHARS = re.compile(r"[^\w\-. :/]")


def resolve_uri(tracking_cfg: TrackingConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file ``./mlflow.db``.
    SQLite paths are made absolute, so that the printed ``mlflow ui`` command works anywhere."""
    uri = tracking_cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{DEFAULT_DB}"
    db = _sqlite_path(uri)
    # A relative SQLite path would depend on the working directory of each reader.
    return f"sqlite:///{db.resolve()}" if db is not None else uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def ui_command(uri: str) -> str:
    """The shell command that shows the runs of ``uri`` in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the MLflow server is already serving it)"
    return f"mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"


def run_page(uri: str, experiment_id: str | None, run_id: str) -> str:
    """Where to see one run: its page on an MLflow server, or for a local store the
    ``mlflow ui`` command and the run's path in that UI."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"{ui_command(uri)}/{path}"


def metric_key(name: str) -> str:
    """A name MLflow accepts: ``recall@1`` -> ``recall_at_1``; other invalid chars -> ``_``."""
    return _INVALID_KEY_CHARS.sub("_", name.replace("@", "_at_"))


class Tracker(Protocol):
    """What the pipeline logs through: :class:`MlflowTracker` on rank 0, else
    :class:`NullTracker`."""

    run_id: str | None
    experiment_id: str | None
    uri: str

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def metric_history(self, key: str) -> list[tuple[int, float]]: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Every method does nothing: the tracker of ranks other than 0 (and of disabled runs)."""

    run_id: str | None = None
    experiment_id: str | None = None
    uri: str = ""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return []

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    """One MLflow run: created, or continued when ``run_id`` is given.

    Metrics go in one ``log_batch`` per call, with the global step. Params are the
    flattened config; on a continued run only params the run lacks are added (MLflow
    refuses to change a param), and changed values are reported and tagged.
    """

    def __init__(self, tracking_cfg: TrackingConfig, run_id: str | None = None) -> None:
        from mlflow import MlflowClient

        self.uri = resolve_uri(tracking_cfg)
        db = _sqlite_path(self.uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        # (key -> last step logged): what a continued run must not log again.
        self._logged_through: dict[str, int] = {}
        self._params: dict[str, str] = {}
        if run_id:
            self._continue(run_id)
        else:
            self._create(tracking_cfg, db)

    def _create(self, tracking_cfg: TrackingConfig, db: Path | None) -> None:
        name = tracking_cfg.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            # Beside a SQLite store, artifacts go next to the database file, so that the
            # store is one self-contained folder; a server decides for itself.
            location = str(db.parent / "mlartifacts") if db is not None else None
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=tracking_cfg.run_name or None)
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id

    def _continue(self, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            raise RuntimeError(
                f"cannot continue MLflow run {run_id!r} (recorded in the run's checkpoint or "
                f"mlflow_run.txt) at tracking URI {self.uri!r}: {e.message}; point "
                "tracking.uri (or $MLFLOW_TRACKING_URI) at the store the run was started in, "
                "or train into a new train.output_dir"
            ) from e
        self.run_id = run_id
        self.experiment_id = run.info.experiment_id
        for key in run.data.metrics:
            steps = [m.step for m in self.client.get_metric_history(run_id, key)]
            self._logged_through[key] = max(steps, default=-1)
        self._params = dict(run.data.params)
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._params
        values = {metric_key(k): str(v)[:6000] for k, v in params.items()}
        changed = {
            k: (existing[k], v) for k, v in values.items() if k in existing and existing[k] != v
        }
        if changed:
            log.warning(
                "run %s continues with changed params (MLflow keeps the first values): %s",
                self.run_id,
                changed,
            )
            self.set_tags({"resumed_with_changed_params": ",".join(sorted(changed))})
        new = [Param(k, v) for k, v in values.items() if k not in existing]
        existing.update({p.key: p.value for p in new})
        for i in range(0, len(new), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for name, value in metrics.items():
            key = metric_key(name)
            if step <= self._logged_through.get(key, -1):
                continue  # already in the store (a continued run recomputing these steps)
            value = float(value)
            batch.append(Metric(key, value if math.isfinite(value) else float("nan"), now, step))
            self._logged_through[key] = step
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of ``key`` as stored, in step order."""
        history = self.client.get_metric_history(self.run_id, metric_key(key))
        return sorted((m.step, m.value) for m in history)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


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
    run_id: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Tracker]:
    """A run for the duration of a ``with`` block; yields its tracker.

    On the main process with tracking enabled: creates the run, or continues ``run_id``;
    logs ``params`` (nested mappings are flattened: ``{'optim': {'lr': 1}}`` -> ``optim.lr``)
    and ``tags``; writes the run id into ``run_dir`` (pipeline.rundir) so that a later job
    continues the run. Elsewhere the tracker does nothing. The run ends FINISHED when the
    block ends normally, KILLED on KeyboardInterrupt or SystemExit, FAILED on any other
    exception (which propagates).
    """
    from pipeline.config_loader import flatten

    tracker = make_tracker(tracking_cfg, is_main=is_main, run_id=run_id)
    status = "FAILED"
    try:
        if run_dir is not None and tracker.run_id:
            from pipeline.rundir import RunDir

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
        tracker.finish(status)


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
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for ax, (title, series) in zip(axes[0], histories.items()):
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    tracker.log_artifact(path, "plots")
    return path
