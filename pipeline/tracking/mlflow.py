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

An outage never stops training (a run must not die with its tracking server): the start checks that an http(s) server answers
(a one-line :class:`TrackingUnavailable` in seconds otherwise); after that every record goes
through a bounded queue that one thread delivers, retrying until the store is back
(:mod:`pipeline.tracking.outbox`). What is still undelivered when the run ends is written
to a file that ``python -m pipeline.tracking upload FILE`` delivers later, exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.config.schema_services import TrackingConfig
from pipeline.secrets import keep, redact
from pipeline.tracking.base import TrackingUnavailable, metric_key
from pipeline.tracking.outbox import (
    MAX_QUEUED,
    RETRY_MAX_S,
    Outbox,
    deliver,
    is_transient,
    now_ms,
    reason,
    write_undelivered,
)

log = logging.getLogger(__name__)


DEFAULT_DB = "mlflow.db"


# How long finish() waits for the queue before writing what is left to a file.
DRAIN_TIMEOUT_S = 30.0


# MLflow's own HTTP retries (default 7, back-off factor 2, 120 s timeout: minutes per call)
# are what made a dead server fail the start after 4 minutes and freeze the loop. In a
# training process the outbox retries forever on its own, so each HTTP call may fail fast:
# a refused connection or an unknown host at once, a hung server after the timeout (10 s:
# the first call to a cold server on a loaded machine took 2 s). The upload command, run by
# hand, prefers patience.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


_UPLOAD_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _bound_http_requests(defaults: dict[str, str] = _HTTP_DEFAULTS) -> None:
    """Set MLflow's HTTP retry and timeout variables for this process, unless the user did."""
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def _unavailable_message(uri: str, e: BaseException) -> str:
    return (
        f"the MLflow tracking server at {uri} does not answer ({reason(e)}): start it "
        f"(mlflow server --host ... --port ...), point tracking.uri (or $MLFLOW_TRACKING_URI) "
        "at a running one, or set tracking.enabled=false"
    )


def _check_server(client: Any, uri: str) -> None:
    """Raise :class:`TrackingUnavailable` unless an MLflow server answers at ``uri``: here,
    in seconds, rather than in the first log call minutes into the run."""
    from mlflow.exceptions import MlflowException

    try:
        client.search_experiments(max_results=1)  # the cheapest call a server must serve
    except MlflowException as e:
        if is_transient(e):
            raise TrackingUnavailable(_unavailable_message(uri, e)) from None
        code = e.get_http_status_code()
        fix = (
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            if code in (401, 403)
            else "point tracking.uri (or $MLFLOW_TRACKING_URI) at the MLflow server"
        )
        raise TrackingUnavailable(
            f"{uri} answers, but not as an MLflow tracking server would (HTTP {code} to "
            f"experiments/search): {fix}, or set tracking.enabled=false"
        ) from None


def resolve_uri(tracking_cfg: TrackingConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file ``./mlflow.db``.
    SQLite paths are made absolute, so that the printed ``mlflow ui`` command works anywhere."""
    uri = tracking_cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    # Credentials in the URI go to MLflow's own variables; the URI kept and written has none.
    uri = keep(uri, "tracking.uri" if tracking_cfg.uri else "MLFLOW_TRACKING_URI")
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


class MlflowTracker:
    """One MLflow run: created, or continued when ``run_id`` is given.

    Start-up talks to the store synchronously and fails fast (:class:`TrackingUnavailable`)
    when an http(s) server does not answer. After that nothing waits for the store: metrics,
    params and tags go into an :class:`Outbox` that one background thread delivers in order,
    retrying with back-off through an outage. Metrics of one call share a
    timestamp and step; params are the flattened config; on a continued run only params the
    run lacks are added (MLflow refuses to change a param), and changed values are reported
    and tagged. :meth:`finish` waits a bounded time for the queue, then writes what is left
    to the run directory's undelivered file (``RunDir.undelivered``) for ``python -m
    pipeline.tracking upload``.
    """

    def __init__(
        self,
        tracking_cfg: TrackingConfig,
        run_id: str | None = None,
        *,
        spool_dir: str | Path | None = None,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        max_queued: int = MAX_QUEUED,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        """``spool_dir``: where :meth:`finish` writes undelivered records and where the queue
        spills past ``max_queued`` records (default: given to :meth:`finish`, else the
        system's temporary directory). ``drain_timeout_s``: how long :meth:`finish` waits for
        the queue. ``retry_max_s``: the longest pause between two tries during an outage.

        With an http(s) URI, MLflow's ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and
        ``MLFLOW_HTTP_REQUEST_TIMEOUT`` default to 0 and 10 s in this process (values the user
        set win): the start-up check then takes seconds, and the queue does the retrying."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.uri = resolve_uri(tracking_cfg)
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.drain_timeout_s = drain_timeout_s
        self.undelivered_path: Path | None = None
        self._finished = False
        db = _sqlite_path(self.uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        if _is_http(self.uri):
            _bound_http_requests()
        self.client = MlflowClient(tracking_uri=self.uri)
        # (key -> last step logged): what a continued run must not log again.
        self._logged_through: dict[str, int] = {}
        self._params: dict[str, str] = {}
        if _is_http(self.uri):
            _check_server(self.client, self.uri)
        try:
            if run_id:
                self._continue(run_id)
            else:
                self._create(tracking_cfg, db)
        except MlflowException as e:
            if _is_http(self.uri) and is_transient(e):
                raise TrackingUnavailable(_unavailable_message(self.uri, e)) from None
            raise
        self._outbox = Outbox(
            partial(deliver, self.client, self.run_id),
            name=f"mlflow-{self.run_id}",
            max_queued=max_queued,
            spill_dir=self.spool_dir,
            retry_max_s=retry_max_s,
            label=self.uri,
        )

    @staticmethod
    def check(tracking_cfg: TrackingConfig) -> None:
        """Raise :class:`TrackingUnavailable` within seconds unless the store of
        ``tracking_cfg`` answers; creates nothing. For a caller that builds the tracker late
        (the trainer needs the run id from a checkpoint) but must fail before the engine."""
        uri = resolve_uri(tracking_cfg)
        if _is_http(uri):
            from mlflow import MlflowClient

            _bound_http_requests()
            _check_server(MlflowClient(tracking_uri=uri), uri)

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
            if is_transient(e):
                raise
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

    @property
    def pending(self) -> int:
        """Records queued or in flight, not yet in the store."""
        return self._outbox.pending

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self._params
        values = {metric_key(k): redact(str(v))[:6000] for k, v in params.items()}
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
        new = {k: v for k, v in values.items() if k not in existing}
        existing.update(new)
        if new:
            self._outbox.put({"kind": "params", "values": new})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; returns at once, whether the store answers or not."""
        values = {}
        for name, value in metrics.items():
            key = metric_key(name)
            if step <= self._logged_through.get(key, -1):
                continue  # already in the store (a continued run recomputing these steps)
            value = float(value)
            values[key] = value if math.isfinite(value) else float("nan")
            self._logged_through[key] = step
        if values:
            now = int(time.time() * 1000)
            self._outbox.put({"kind": "metrics", "step": step, "timestamp": now, "values": values})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload ``path`` now if the store answers, else queue it (uploaded when it is back,
        or by ``upload`` from the undelivered file): a file's upload can take longer than
        :meth:`finish` waits, so a reachable store gets it synchronously."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist: log it after writing it")
        record = {"kind": "artifact", "path": str(path), "artifact_path": artifact_path}
        if self._outbox.outage_since is None:
            try:
                deliver(self.client, self.run_id, [record])
                return
            except Exception as e:
                if not is_transient(e):
                    raise
        self._outbox.put(record)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._outbox.put({"kind": "tags", "values": {k: redact(str(v)) for k, v in tags.items()}})

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of ``key``, in step order: those in the store and those
        still queued (the store's part is left out, with a warning, if it does not answer)."""
        key = metric_key(key)
        stored = []
        try:
            stored = [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
        except Exception as e:
            if not is_transient(e):
                raise
            log.warning("metric history of %r: %s", key, reason(e))
        queued = [
            (r["step"], r["values"][key])
            for r in self._outbox.snapshot()
            if r["kind"] == "metrics" and key in r["values"]
        ]
        return sorted(dict(stored + queued).items())

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every queued record to reach the store; True if so."""
        return self._outbox.wait_empty(timeout_s)

    def finish(
        self,
        status: str = "FINISHED",
        *,
        spool_dir: str | Path | None = None,
        timeout_s: float | None = None,
    ) -> Path | None:
        """End the run with ``status``, waiting up to ``timeout_s`` (default
        ``drain_timeout_s``) for the queue. Records still undelivered then (the status
        included) are appended to ``RunDir(spool_dir).undelivered`` (default: the constructor's
        ``spool_dir``, else a temporary file), and the upload command is printed. Returns
        that file, or None when everything was delivered. A second call does nothing."""
        if self._finished:
            return self.undelivered_path
        self._finished = True
        self._outbox.put({"kind": "status", "status": status, "end_time": now_ms()})
        timeout_s = self.drain_timeout_s if timeout_s is None else timeout_s
        left = self._outbox.close(timeout_s)
        if not left:
            return None
        directory = Path(spool_dir) if spool_dir is not None else self.spool_dir
        self.undelivered_path = write_undelivered(left, directory, self.uri, self.run_id)
        log.warning(
            "%d records of MLflow run %s did not reach %s within %g s; kept in %s; deliver them "
            "when the store answers with: python -m pipeline.tracking upload %s",
            *(len(left), self.run_id, self.uri, timeout_s, self.undelivered_path),
            self.undelivered_path,
        )
        return self.undelivered_path
