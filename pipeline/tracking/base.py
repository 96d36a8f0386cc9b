"""What the pipeline logs through: the :class:`Tracker` protocol, and :class:`NullTracker`,
the tracker of every rank but the main one (decided once, at setup)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import UserError

# MLflow accepts alphanumerics, '_', '-', '.', ' ', ':' and '/' in metric and param names.
_INVALID_KEY_CHARS = re.compile(r"[^\w\-. :/]")


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

    def flush(self, timeout_s: float) -> bool: ...

    def finish(
        self,
        status: str = "FINISHED",
        *,
        spool_dir: str | Path | None = None,
        timeout_s: float | None = None,
    ) -> Path | None: ...


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

    def flush(self, timeout_s: float) -> bool:
        return True

    def finish(
        self,
        status: str = "FINISHED",
        *,
        spool_dir: str | Path | None = None,
        timeout_s: float | None = None,
    ) -> Path | None:
        return None


class TrackingUnavailable(UserError, RuntimeError):
    """The tracking server does not answer when the run starts (a user error, reported in
    one line before the engine is built)."""
