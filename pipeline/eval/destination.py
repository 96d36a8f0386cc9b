"""Where ``pipeline evaluate`` writes: a folder of its own, never a training run's evaluation.

A training run's final evaluation (``RUN/eval/``, or the ``eval.output_dir`` it trained with)
is part of its record, next to the weights it measured. A later evaluation of those weights (on
another split, with other settings, with a newer version of the code) goes to
``--out DIR``, else ``eval.output_dir``, else ``RUN/evaluations/<UTC time>/`` of the run whose
weights it evaluates (``train.output_dir``'s for weights outside a run folder). Writing into a
training run's own evaluation folder needs ``--force``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import yaml

from pipeline.config.runconfig import RunConfig
from pipeline.errors import UserError
from pipeline.rundir import RunDir


class EvalOutputError(UserError, ValueError):
    """``pipeline evaluate`` was pointed at a training run's own evaluation folder."""


def _own_evaluations(cfg: RunConfig, weights: str) -> list[tuple[RunDir, Path]]:
    """The training runs concerned (the weights' run, ``train.output_dir``'s) with each of
    their own evaluation folders."""
    runs = [r for r in (RunDir.holding(weights), RunDir.of(cfg)) if r and r.config.is_file()]
    found = []
    for run in runs:
        found.append((run, run.eval))
        saved = yaml.safe_load(run.config.read_text()) or {}
        trained_into = (saved.get("eval") or {}).get("output_dir") or ""
        if trained_into:
            found.append((run, Path(trained_into)))
    return found


def evaluation_folder(
    cfg: RunConfig,
    weights: str,
    out: str | None = None,
    *,
    force: bool = False,
    now: datetime | None = None,
) -> Path:
    """The folder an evaluation of ``weights`` writes to (see the module's docstring); an
    :class:`EvalOutputError` when it is a training run's own evaluation and not ``force``.
    Reads the clock: decide on one rank and share it."""
    if out:
        dest = Path(out)
    elif cfg.eval.output_dir:
        dest = Path(cfg.eval.output_dir)
    else:
        base = (RunDir.holding(weights) or RunDir.of(cfg)).evaluations
        stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
        dest, n = base / stamp, 1
        while dest.exists():  # two evaluations in one second
            dest, n = base / f"{stamp}-{n}", n + 1
    if force:
        return dest
    for run, own in _own_evaluations(cfg, weights):
        if dest.resolve() == own.resolve():
            given = f"--out {out}" if out else f"eval.output_dir={cfg.eval.output_dir}"
            raise EvalOutputError(
                f"{given} is the evaluation folder of the training run {run.root}, which "
                f"`pipeline evaluate` never replaces: leave both unset to write "
                f"{run.evaluations}/<time>/, pass --out DIR elsewhere, or add --force to "
                "replace the run's own evaluation"
            )
    return dest
