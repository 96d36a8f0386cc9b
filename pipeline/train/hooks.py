"""What runs beside the training step, each at its own cadence: one small protocol, :class:`Hook`.

The trainer calls ``maybe(step)`` on every hook after each optimizer step, in order, and
``close()`` once when the run ends; each hook decides itself whether the step is its turn.

:func:`tracking` opens the run's MLflow session and :func:`announce` starts it.

* :class:`MetricLogger`: the loss of the global batch, learning rate, throughput, data wait and
  gradient norm every ``train.log_every`` steps and at the last one;
* :class:`EvalHook`: retrieval metrics every ``eval.every`` steps (not the last one);
* :class:`Checkpointer`: a collective checkpoint every ``train.checkpoint_every`` steps and at
  the last one, with the loss's state when it keeps one (pipeline.loss.LossState);
* :class:`HostMetrics`: each host's CPU, memory and GPU sampled into the run;
* :class:`FinalExport`: at the last step, the final evaluation (files in the eval folder), the
  fp32 weights, the curves, the MLflow model (registered under ``tracking.register_model``)
  and the result.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from pipeline.config.load import save_config
from pipeline.config.runconfig import RunConfig, to_dict
from pipeline.data import storage
from pipeline.data.transforms import SCHEME_KEY, weights_scheme
from pipeline.distributed import collectives, group
from pipeline.eval.evaluator import evaluate_model
from pipeline.loss import LossState
from pipeline.provenance import training_provenance
from pipeline.rundir import RunDir, eval_output_dir
from pipeline.tracking import sysmetrics
from pipeline.tracking.base import NullTracker
from pipeline.tracking.mlflow import resolve_uri, run_page
from pipeline.tracking.session import log_curves, tracking_session
from pipeline.train import checkpoint
from pipeline.train.checkpoint import TrainState
from pipeline.train.engine import describe, fp32_state_dict
from pipeline.weights import save_weights

log = logging.getLogger(__name__)

# Panels of the curves artifact: title -> metric keys.
CURVES = {
    "loss": ["train/loss"],
    "retrieval": ["eval/recall_at_1", "eval/map_at_r"],
}


def tracking(cfg: RunConfig, engine: Any, *, world: int, done: bool) -> Any:
    """The run's tracking session (a context manager giving the tracker): a real MLflow run
    on rank 0, continuing the one the run directory records; a null tracker when there is
    nothing to train."""
    if done:  # nothing to train: no run to start or continue
        return nullcontext(NullTracker())
    tags = {"world_size": str(world), "engine": describe(engine)}
    return tracking_session(
        cfg.tracking,
        is_main=group.is_main_process(),
        run_dir=RunDir.of(cfg).root,
        params=to_dict(cfg),
        tags=tags,
    )


def announce(
    cfg: RunConfig, tracker: Any, engine: Any, step: int, resumed_from: int | None
) -> None:
    """The resolved config into the run directory and the run; one line on what trains."""
    run_dir = RunDir.of(cfg)
    if group.is_main_process():  # a file write; no collective in here
        save_config(cfg, run_dir.config)
    tracker.log_artifact(run_dir.config)
    spe, world = cfg.sampler.steps_per_epoch, group.get_world_size()
    log.info(
        "training %d steps (%d epochs x %d), %d ranks x %d images, %s%s",
        *(cfg.train.epochs * spe, cfg.train.epochs, spe, world, cfg.sampler.batch_size_per_gpu),
        describe(engine),
        f"; resumed at step {step} from {run_dir.checkpoints}" if resumed_from is not None else "",
    )
    if tracker.run_id:
        page = run_page(tracker.uri, tracker.experiment_id, tracker.run_id)
        log.info("MLflow run %s: %s", tracker.run_id, page)


class Hook(Protocol):
    def maybe(self, step: int) -> Any:
        """Act if ``step`` is this hook's turn. All ranks call it at every step."""

    def close(self) -> None:
        """The run ends (normally or not)."""


class MetricLogger:
    """Training metrics: gathered every step, logged every ``train.log_every`` steps and at
    the last one (MLflow, the progress bar, a line in the rank's log file)."""

    def __init__(
        self, tracker: Any, *, log_every: int, total_steps: int, start_step: int, show: bool
    ) -> None:
        self.tracker, self.every, self.total = tracker, log_every, total_steps
        self.retries_before = storage.read_retries()
        self.progress = tqdm(
            total=total_steps, initial=start_step, disable=not show, desc="train", mininterval=2.0
        )
        self._reset()

    def _reset(self) -> None:
        self.data_s = self.total_s = 0.0
        self.steps = self.images = 0

    def record(
        self, loss: torch.Tensor, *, lr: float, grad_norm: float | None, images: int
    ) -> None:
        """What the step just done produced (called by the trainer's step)."""
        self.loss, self.lr, self.grad_norm = loss, lr, grad_norm
        self.steps += 1
        self.images += images
        self.progress.update(1)

    def add_time(self, data_s: float, step_s: float) -> None:
        self.data_s += data_s
        self.total_s += step_s

    def maybe(self, step: int) -> float | None:
        """Log when due; returns the global batch's loss then. All ranks participate."""
        if step % self.every and step != self.total:
            return None
        # All ranks participate: the mean of the ranks' losses is the loss of the global
        # batch (pipeline.loss).
        loss = float(collectives.all_reduce_sum(self.loss.float())) / group.get_world_size()
        total = max(self.total_s, 1e-9)
        metrics = {
            "train/loss": loss,
            "train/lr": self.lr,
            "train/images_per_s": self.images / total,
            "train/data_wait_frac": self.data_s / total,
            "train/step_time_s": total / max(self.steps, 1),
        }
        if self.grad_norm is not None:
            metrics["train/grad_norm"] = self.grad_norm
        # All ranks participate: transient shard-read failures retried in this run, all ranks.
        retried = storage.read_retries() - self.retries_before
        retries = collectives.all_reduce_sum(torch.tensor(float(retried)))
        metrics["data/read_retries"] = float(retries)
        self.tracker.log_metrics(metrics, step)
        img_s = metrics["train/images_per_s"]
        self.progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.0f}", refresh=False)
        log.info(
            "step %d/%d: loss %.4f, lr %.3g, %.0f images/s, data wait %.0f%%, %d read retries",
            *(step, self.total, loss, self.lr, img_s, 100 * metrics["train/data_wait_frac"]),
            int(metrics["data/read_retries"]),
        )
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {step}: lower optim.lr, or check "
                "train.gradient_clipping and the data"
            )
        self._reset()
        return loss

    def close(self) -> None:
        self.progress.close()


class EvalHook:
    """Retrieval metrics of the model during training: every ``eval.every`` steps (not at
    the last, which :class:`FinalExport` evaluates), logged as ``eval/<metric>``."""

    def __init__(self, cfg: RunConfig, engine: Any, tracker: Any, *, total_steps: int) -> None:
        self.cfg, self.engine, self.tracker, self.total = cfg, engine, tracker, total_steps

    def maybe(self, step: int) -> dict[str, float] | None:
        every = self.cfg.eval.every
        if not every or step % every or step >= self.total:
            return None
        metrics = self.evaluate(step)
        log.info("step %d: %s", step, metrics)
        return metrics

    def evaluate(self, step: int, output_dir: Path | None = None) -> dict[str, float]:
        """Evaluate now; with ``output_dir``, also write (and log) the evaluation files.
        All ranks participate."""
        model = self.engine.module
        was_training = model.training
        model.eval()
        try:
            # The long timeout: the others wait while rank 0 computes the metrics and writes.
            with group.long_timeout():
                metrics = evaluate_model(
                    model,
                    self.cfg.data,
                    self.cfg.eval,
                    device=self.engine.device,
                    output_dir=output_dir,
                    tracker=self.tracker,
                    step=step,
                    progress=group.is_main_process(),
                )
        finally:
            model.train(was_training)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def close(self) -> None:
        pass


class Checkpointer:
    """Collective checkpoints every ``train.checkpoint_every`` steps and at the last one."""

    def __init__(
        self,
        engine: Any,
        run_dir: RunDir,
        *,
        every: int,
        keep: int,
        total_steps: int,
        state_at: Callable[[int], TrainState],
        loss_state: LossState | None,
    ) -> None:
        self.engine, self.root, self.every, self.keep = engine, run_dir.checkpoints, every, keep
        self.total, self.state_at, self.loss_state = total_steps, state_at, loss_state
        self.saved_step: int | None = None

    def maybe(self, step: int) -> bool:
        if step % self.every and step != self.total:
            return False
        self.save(step)
        return True

    def save(self, step: int) -> None:
        # All ranks participate (collective save; 'latest' moves once all have written), under
        # the long timeout: the others wait while rank 0 hashes the files and prunes.
        with group.long_timeout():
            checkpoint.save_state(
                self.engine, self.root, self.state_at(step), self.keep, loss_state=self.loss_state
            )
        self.saved_step = step

    def close(self) -> None:
        pass


class HostMetrics:
    """Each host's first rank samples CPU/memory/GPU into the run (pipeline.sysmetrics)
    until :meth:`close`; all ranks construct it (only rank 0 knows the run id)."""

    def __init__(self, cfg: RunConfig, tracker: Any) -> None:
        # All ranks participate: only rank 0 knows the run id.
        run_id = collectives.on_main(lambda: tracker.run_id)
        uri = resolve_uri(cfg.tracking)
        local_rank = group.get_local_rank()
        # A SQLite file is written by rank 0's host only: several hosts writing one file over
        # a network filesystem can corrupt it.
        if not uri.startswith(("http://", "https://")) and not group.is_main_process():
            local_rank = -1
        self.handle = sysmetrics.start(
            run_id,
            tracking_uri=uri,
            local_rank=local_rank,
            interval_s=cfg.tracking.system_metrics_interval_s,
        )

    def maybe(self, step: int) -> None:
        pass  # samples on its own thread

    def close(self) -> None:
        self.handle.stop()  # before the run ends: it writes the queued samples


class FinalExport:
    """At the last step: the final evaluation, weights, curves, MLflow model and result
    (:attr:`result`, on every rank). All ranks participate."""

    def __init__(self, cfg: RunConfig, engine: Any, tracker: Any, evaluator: EvalHook) -> None:
        self.cfg, self.engine, self.tracker, self.evaluator = cfg, engine, tracker, evaluator
        self.run_dir = RunDir.of(cfg)
        self.total = evaluator.total
        self.resumed_from: int | None = None
        self.result: dict[str, Any] | None = None

    def maybe(self, step: int) -> dict[str, Any] | None:
        if step < self.total or self.result is not None:
            return None
        self.result = self.finish(step)
        return self.result

    def finish(self, step: int) -> dict[str, Any]:
        # All ranks participate in the final evaluation.
        final = self.evaluator.evaluate(step, output_dir=eval_output_dir(self.cfg))
        log.info("final evaluation at step %d: %s", step, final)
        state = fp32_state_dict(self.engine)
        result = {
            "step": step,
            "run_id": self.tracker.run_id,
            "tracking_uri": self.tracker.uri,
            "metrics": final,
            "weights": str(self.run_dir.weights),
            "resumed_from": self.resumed_from,
            "output_dir": str(self.run_dir.root),
        }
        if group.is_main_process():  # files only; no collective in here
            # The weights carry their origin (run, step, config, catalogs, code, crop).
            meta = training_provenance(self.cfg, run_id=result["run_id"], step=step)
            meta[SCHEME_KEY] = json.dumps(weights_scheme(self.cfg.data))
            save_weights(state, self.engine.module.architecture, self.run_dir.weights, meta)
            self.tracker.log_artifact(self.run_dir.weights)
            log_curves(self.tracker, CURVES, self.run_dir.curves)
            self._log_model(meta)
            self.run_dir.write_result(result)
        return result

    def _log_model(self, provenance: dict[str, str]) -> None:
        """Rank 0: the model as an MLflow model, registered under tracking.register_model.
        Tracking never stops training: a failure is reported with the command to redo it."""
        name = self.cfg.tracking.register_model
        if not (name and self.tracker.run_id):
            return
        # The serving layer sits above training, and loading it defines the MLflow model
        # class (mlflow.pyfunc prints warnings on stderr then): only when a model is registered.
        from pipeline.serve.export import log_mlflow_model

        weights, config = self.run_dir.weights, self.run_dir.config
        try:
            logged = log_mlflow_model(
                self.engine.module,
                self.cfg.data,
                tracking_uri=self.tracker.uri,
                run_id=self.tracker.run_id,
                registered_model_name=name,
                provenance=provenance,
            )
            log.info("MLflow model %s version %s: %s", name, logged.version, logged.model_uri)
        except Exception as e:
            log.error(
                "could not log the model to MLflow (%s: %s); the weights are in %s: register "
                "them later with `pipeline export --config %s checkpoint=%s --mlflow "
                "--register-model %s`",
                *(type(e).__name__, e, weights, config, weights, name),
            )

    def close(self) -> None:
        pass
