"""``pipeline train``: Smooth-AP training with DeepSpeed, one process, torchrun or srun.

:class:`Trainer` holds a run: ``Trainer(cfg)`` builds the model, engine, loss, tracker and run
state (resuming from the latest checkpoint of ``train.output_dir``); :meth:`Trainer.train`
loops over :meth:`Trainer.train_step`, and three hooks each decide their own cadence: the
:class:`MetricLogger` (``train.log_every``), the :class:`EvalHook` (``eval.every``) and the
:class:`Checkpointer` (``train.checkpoint_every``); :meth:`Trainer.finish` evaluates once more
and writes the weights, the result and the curves. :func:`train` is what entry points call.

The same call resumes: weights, optimizer, schedule, step, data position and MLflow run come
back from the checkpoint; on a finished run it returns the recorded result.

Reproducibility: initial weights come from ``train.seed`` (DeepSpeed broadcasts rank 0's);
the batches from (``sampler.seed``, epoch, rank, world size, step) (pipeline.data.stream);
every step reseeds torch's generators from (``train.seed``, rank, step), so dropout and
augmentation-free randomness do not depend on what ran before. With
``train.deterministic`` on CPU, a run killed and resumed ends with the same weights as an
uninterrupted one (tests/test_train_resume.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.config import RunConfig, to_dict
from pipeline.config_loader import load_config, save_config
from pipeline.rundir import RunDir, eval_output_dir
from pipeline.train import checkpoint
from pipeline.train.batchnorm import policy_for
from pipeline.train.checkpoint import TrainState
from pipeline.train.runlock import RunLock
from pipeline.train.signals import StopRequest, exit_with_parent

log = logging.getLogger(__name__)

# Panels of the curves artifact: title -> metric keys.
CURVES = {
    "loss": ["train/loss"],
    "retrieval": ["eval/recall_at_1", "eval/map_at_r"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (conf/experiments/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. optim.lr=0.0001 train.output_dir=runs/x",
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    # Joins the job's group with the run's collective timeout and always leaves it.
    with distributed.process_group(timeout_s=cfg.train.collective_timeout_s):
        result = train(cfg)
        if distributed.is_main_process():
            # stdout carries exactly this line (scripts parse it); messages go to the log.
            print(json.dumps({k: result[k] for k in ("step", "metrics", "weights", "run_id")}))
    return 0


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes; returns its result on every rank.

    Runs on every rank of the job (reads the rank environment through
    ``pipeline.distributed.init``). The result: ``step``, ``run_id`` (MLflow, rank 0),
    ``tracking_uri``, ``metrics`` (final evaluation), ``weights`` (fp32 ``.safetensors``),
    ``resumed_from`` (step or None), ``output_dir``.
    """
    distributed.setup_logging(RunDir.of(cfg).root)
    return Trainer(cfg).train()


# ---------------------------------------------------------------------------- helpers


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _set_determinism(on: bool) -> None:
    if not on:
        return
    # cuBLAS needs a fixed workspace for deterministic results (read when CUDA starts).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def _then(fn: Callable, on_phase: Callable[[str], None], name: str) -> Callable:
    """``fn`` followed by ``on_phase(name)`` (phase timing for benchmarks)."""

    def call(*args: Any) -> Any:
        out = fn(*args)
        on_phase(name)
        return out

    return call


# ---------------------------------------------------------------------------- hooks


class MetricLogger:
    """Training metrics: gathered every step, logged every ``train.log_every`` steps and at
    the last one (MLflow, the progress bar, a line in the rank's log file)."""

    def __init__(
        self, tracker: Any, *, log_every: int, total_steps: int, start_step: int, show: bool
    ) -> None:
        from tqdm import tqdm

        self.tracker, self.every, self.total = tracker, log_every, total_steps
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
        """What the step just done produced (called by :meth:`Trainer.train_step`)."""
        self.loss, self.lr, self.grad_norm = loss, lr, grad_norm
        self.steps += 1
        self.images += images
        self.progress.update(1)

    def add_time(self, data_s: float, step_s: float) -> None:
        self.data_s += data_s
        self.total_s += step_s

    def maybe_log(self, step: int) -> float | None:
        """Log when due; returns the global batch's loss then. All ranks participate."""
        if step % self.every and step != self.total:
            return None
        # All ranks participate: the mean of the ranks' losses is the loss of the global
        # batch (pipeline.loss).
        loss = float(distributed.all_reduce_sum(self.loss.float())) / distributed.get_world_size()
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
        self.tracker.log_metrics(metrics, step)
        img_s = metrics["train/images_per_s"]
        self.progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.0f}", refresh=False)
        log.info(
            "step %d/%d: loss %.4f, lr %.3g, %.0f images/s, data wait %.0f%%",
            *(step, self.total, loss, self.lr, img_s, 100 * metrics["train/data_wait_frac"]),
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
    the last, which :meth:`Trainer.finish` evaluates), logged as ``eval/<metric>``."""

    def __init__(self, cfg: RunConfig, engine: Any, tracker: Any, *, total_steps: int) -> None:
        self.cfg, self.engine, self.tracker, self.total = cfg, engine, tracker, total_steps

    def maybe_evaluate(self, step: int) -> dict[str, float] | None:
        every = self.cfg.eval.every
        if not every or step % every or step >= self.total:
            return None
        metrics = self.evaluate(step)
        log.info("step %d: %s", step, metrics)
        return metrics

    def evaluate(self, step: int, output_dir: Any = None) -> dict[str, float]:
        """Evaluate now; with ``output_dir``, also write (and log) the evaluation files.
        All ranks participate."""
        from pipeline.eval.evaluator import evaluate_model

        model = self.engine.module
        was_training = model.training
        model.eval()
        try:
            metrics = evaluate_model(
                model,
                self.cfg.data,
                self.cfg.eval,
                device=self.engine.device,
                output_dir=output_dir,
                tracker=self.tracker,
                step=step,
                progress=distributed.is_main_process(),
            )
        finally:
            model.train(was_training)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


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
    ) -> None:
        self.engine, self.root, self.every, self.keep = engine, run_dir.checkpoints, every, keep
        self.total, self.state_at = total_steps, state_at

    def maybe_save(self, step: int) -> bool:
        if step % self.every and step != self.total:
            return False
        # All ranks participate (collective save; 'latest' moves once all have written).
        checkpoint.save_state(self.engine, self.root, self.state_at(step), self.keep)
        return True


# ---------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run (see the module doc). Every method runs on every rank."""

    def __init__(self, cfg: RunConfig) -> None:
        from pipeline.loss import SmoothAPLoss

        self.cfg = cfg
        if not torch.distributed.is_initialized():
            # Once per process: a second Trainer (benchmarks) reuses the group, including
            # the one-process group DeepSpeed needs (pipeline.train.engine). The timeout
            # bounds every collective: a lost host ends the job instead of hanging it.
            distributed.init(timeout_s=cfg.train.collective_timeout_s)
        _set_determinism(cfg.train.deterministic)
        self.rank, self.world = distributed.get_rank(), distributed.get_world_size()
        self.is_main = self.rank == 0
        if self.world > 1:
            exit_with_parent()  # torchrun starts ranks in their own sessions (issue 10)
        self.run_dir = RunDir.of(cfg)
        self._lock: RunLock | None = None
        # All ranks participate: rank 0 checks what the config, the shards, the checkpoints
        # and the tracking store can reveal in seconds, before DeepSpeed starts.
        plan = distributed.on_main(self._plan)
        self._adapt_to_world_size(plan)
        cfg = self.cfg
        self.hosts = distributed.rank_hosts()  # named when a rank or host is lost
        self.steps_per_epoch = cfg.sampler.steps_per_epoch
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.batch_size = cfg.sampler.batch_size_per_gpu
        self._build_engine()
        self.loss_fn = SmoothAPLoss(
            cfg.loss.temperature, cfg.loss.query_in_positives, cfg.loss.query_chunk_size
        )
        self._resume(plan["tag"])
        self.done = self.step >= self.total_steps and self.run_dir.result.is_file()
        with ExitStack() as stack:
            self.tracker = stack.enter_context(self._tracking_session())
            self.metrics = MetricLogger(
                self.tracker,
                log_every=cfg.train.log_every,
                total_steps=self.total_steps,
                start_step=self.step,
                show=self.is_main and not self.done,
            )
            stack.callback(self.metrics.close)
            self.evaluator = EvalHook(cfg, self.engine, self.tracker, total_steps=self.total_steps)
            self.checkpointer = Checkpointer(
                self.engine,
                self.run_dir,
                every=cfg.train.checkpoint_every,
                keep=cfg.train.keep_checkpoints,
                total_steps=self.total_steps,
                state_at=self.train_state,
            )
            # Closed by train() (or close()), with the status the run ended with.
            self._session = stack.pop_all()

    def _plan(self) -> dict[str, Any]:
        """Rank 0, before the engine: take the run directory's lock, choose the checkpoint
        to resume from (the newest complete one), work out P per rank for a resume on another
        world size, run the preflight checks of the config and shards, and check the
        tracking store. Returns what every rank needs (see ``distributed.on_main``)."""
        from pipeline.preflight import preflight
        from pipeline.tracking import MlflowTracker
        from pipeline.train import elastic

        cfg, root = self.cfg, self.run_dir.checkpoints
        self._lock = RunLock(self.run_dir.root).acquire()
        try:
            tag = checkpoint.resumable_tag(root)
            per_rank = cfg.sampler.classes_per_batch
            global_batch = None
            if tag is not None:
                layout = elastic.saved_layout(root / tag)
                global_batch = layout.world_size * layout.batch_size_per_gpu
                if layout.world_size != self.world:
                    k = cfg.sampler.samples_per_class
                    per_rank = elastic.classes_per_batch_for(
                        layout.world_size, layout.classes_per_batch(k), self.world
                    )
            planned = replace(cfg, sampler=replace(cfg.sampler, classes_per_batch=per_rank))
            if not self.run_dir.result.is_file():  # a finished run needs no data
                report = preflight(planned, self.world, global_batch=global_batch)
                log.info("preflight passed in %.2f s", report.seconds)
            if cfg.tracking.enabled:
                MlflowTracker.check(cfg.tracking)
            if cfg.tracking.register_model:
                import pipeline.export  # noqa: F401  (needs the export extra: fail now)
        except BaseException:
            self._lock.release()
            raise
        return {"tag": tag, "classes_per_batch": per_rank}

    def _adapt_to_world_size(self, plan: dict[str, Any]) -> None:
        """Resuming on another number of ranks keeps the global batch: P per rank changes
        (pipeline.train.elastic); the rest of the interrupted epoch is drawn in another order."""
        per_rank = plan["classes_per_batch"]
        if per_rank != self.cfg.sampler.classes_per_batch:
            log.warning(
                "resuming %s on %d ranks: sampler.classes_per_batch %d -> %d keeps the "
                "checkpoint's global batch; the rest of the interrupted epoch is drawn in "
                "another order than on the old number of ranks",
                *(plan["tag"], self.world, self.cfg.sampler.classes_per_batch, per_rank),
            )
            sampler = replace(self.cfg.sampler, classes_per_batch=per_rank)
            self.cfg = replace(self.cfg, sampler=sampler)

    def _build_engine(self) -> None:
        from pipeline.model import build_model
        from pipeline.train.engine import build_engine
        from pipeline.train.optim import build_optimizer, build_scheduler

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        # One model on every rank: frozen, synchronised or broadcast BatchNorm.
        self.batchnorm = policy_for(
            model,
            cfg.model,
            world_size=self.world,
            chunk_size=cfg.train.chunk_size,
            batch=self.batch_size,
        )
        model = self.batchnorm.prepare(model)
        optimizer = build_optimizer(model, cfg.optim, cfg.model.head_lr_mult)
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps)
        # All ranks participate (process group, weight broadcast).
        self.engine = build_engine(model, optimizer, self.scheduler, cfg.train, self.batch_size)
        checkpoint.install_safe_loading(self.engine)
        self.device = self.engine.device
        self.on_gpu = torch.device(self.device).type == "cuda"
        chunk = cfg.train.chunk_size
        self.chunked = 0 < chunk < self.batch_size

    def _resume(self, tag: str | None) -> None:
        # All ranks participate: DeepSpeed loads every rank's partitions.
        root = self.run_dir.checkpoints
        state = checkpoint.resume(self.engine, root, self.engine.module.architecture, tag)
        # All ranks participate: a checkpoint holds rank 0's BatchNorm statistics only.
        self.batchnorm.after_resume(self.engine.module)
        self.step = state.step if state else 0
        self.resumed_from = self.step if state else None
        self.run_id = (state.mlflow_run_id if state else "") or self.run_dir.read_run_id()

    def _tracking_session(self) -> Any:
        from pipeline.tracking import NullTracker, tracking_session
        from pipeline.train.engine import describe

        if self.done:  # nothing to train: no run to start or continue
            return nullcontext(NullTracker())
        tags = {"world_size": str(self.world), "engine": describe(self.engine)}
        return tracking_session(
            self.cfg.tracking,
            is_main=self.is_main,
            run_dir=self.run_dir.root,
            run_id=self.run_id,
            params=to_dict(self.cfg),
            tags=tags,
        )

    def train_state(self, step: int) -> TrainState:
        """What a checkpoint at ``step`` records besides weights and optimizer."""
        return TrainState(
            step=step,
            epoch=step // self.steps_per_epoch,
            step_in_epoch=step % self.steps_per_epoch,
            sampler_seed=self.cfg.sampler.seed,
            train_seed=self.cfg.train.seed,  # the RNG state: reseeded from (seed, rank, step)
            world_size=self.world,
            architecture=self.engine.module.architecture,
            mlflow_run_id=self.tracker.run_id or self.run_id or "",
        )

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches from the current step to the last, epoch by epoch."""
        from pipeline.data.stream import train_loader

        spe = self.steps_per_epoch
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, spe)
            loader = train_loader(
                self.cfg.data,
                self.cfg.sampler,
                rank=self.rank,
                world_size=self.world,
                epoch=epoch,
                start_step=start,
                # On a GPU the workers ship uint8 and the device normalises: a 4x smaller
                # batch through shared memory and over PCIe.
                normalise=not self.on_gpu,
            )
            batches = iter(loader)
            for _ in range(start, spe):
                item = next(batches, None)
                if item is None:
                    raise RuntimeError(
                        f"the training stream of rank {self.rank} ended at step {self.step} of "
                        f"epoch {epoch}, before sampler.steps_per_epoch={spe}: every rank must "
                        "yield the same number of batches (pipeline.data.stream.train_loader)"
                    )
                yield item

    def train_step(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        on_phase: Callable[[str], None] | None = None,
    ) -> torch.Tensor:
        """One optimizer step on this rank's batch; returns its local loss (detached).

        ``on_phase(name)`` is called after 'forward' and 'loss' (not with the gradient cache,
        whose phases interleave), 'backward' and 'optimizer'. All ranks participate.
        """
        from pipeline.data.transforms import normalise_batch
        from pipeline.train.engine import grad_norm, reported_grad_norm
        from pipeline.train.gradcache import forward_backward

        engine = self.engine
        # Per-step reseeding makes a resumed step draw the same random numbers.
        torch.manual_seed(_step_seed(self.cfg.train.seed, self.rank, self.step))
        images = images.to(self.device, non_blocking=True)
        if self.on_gpu:
            images = normalise_batch(images)
        labels = labels.to(self.device, non_blocking=True)
        model, loss_fn = engine, self.loss_fn
        if on_phase is not None and not self.chunked:
            model, loss_fn = _then(model, on_phase, "forward"), _then(loss_fn, on_phase, "loss")
        # All ranks participate (the loss gathers; DeepSpeed reduces gradients).
        loss = forward_backward(
            model,
            images,
            labels,
            loss_fn,
            chunk_size=self.cfg.train.chunk_size,
            backward=engine.backward,
            set_boundary=engine.set_gradient_accumulation_boundary,
        )
        if on_phase is not None:
            on_phase("backward")
        norm_before = grad_norm(engine)
        lr = self.scheduler.get_last_lr()[0]
        engine.step()
        # All ranks participate (broadcast BatchNorm: rank 0's statistics to every rank).
        self.batchnorm.after_step(engine.module)
        if on_phase is not None:
            on_phase("optimizer")
        self.step += 1
        norm = reported_grad_norm(engine, norm_before)
        self.metrics.record(loss, lr=lr, grad_norm=norm, images=self.batch_size * self.world)
        return loss

    def train(self) -> dict[str, Any]:
        """Train to the last step, then :meth:`finish`; returns the result on every rank."""
        if self.done:
            log.info(
                "%s: already trained (%d steps); result in %s",
                *(self.run_dir.root, self.step, self.run_dir.result),
            )
            self._release_lock()
            return self.run_dir.read_result()
        try:
            # Ends the MLflow run FINISHED, KILLED or FAILED with the way this block ends.
            with self._session, self._host_metrics():
                self._announce()
                self._loop()
                self.metrics.close()
                result = self.finish()
            # All ranks participate: nobody leaves before rank 0 has written the result.
            distributed.barrier()
        finally:
            self._release_lock()
        return result

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _loop(self) -> None:
        """Steps to the last one; a SIGTERM/SIGUSR1 on any rank ends it after a checkpoint
        (pipeline.train.signals), a lost rank with an error naming the hosts."""
        self.engine.train()
        batches = self._batches()
        with StopRequest(grace_s=self.cfg.train.stop_grace_s) as stop:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                images, labels = next(batches)
                data_s = time.perf_counter() - t0
                try:
                    self.train_step(images, labels)
                    self.metrics.add_time(data_s, time.perf_counter() - t0)
                    self.metrics.maybe_log(self.step)
                    self.evaluator.maybe_evaluate(self.step)
                    saved = self.checkpointer.maybe_save(self.step)
                    # All ranks participate: the ranks receive a signal at different moments.
                    stopping = distributed.any_rank(stop.requested)
                except Exception as e:  # gloo's timeouts are plain RuntimeErrors
                    if not distributed.is_collective_error(e):
                        raise
                    raise self._lost_rank(e) from e
                if stopping:
                    self._stop(stop, saved)

    def _stop(self, stop: StopRequest, saved: bool) -> None:
        if not saved:
            # All ranks participate (collective save).
            checkpoint.save_state(
                self.engine,
                self.run_dir.checkpoints,
                self.train_state(self.step),
                self.cfg.train.keep_checkpoints,
            )
        log.warning(
            "stopping at step %d on %s: checkpoint written; run the same command to resume",
            self.step,
            stop.name or "a signal to another rank",
        )
        raise SystemExit(128 + (stop.signum or 15))

    def _lost_rank(self, error: Exception) -> RuntimeError:
        hosts = ", ".join(f"{h}: ranks {r}" for h, r in self.hosts.items())
        tag = checkpoint.latest_tag(self.run_dir.checkpoints)
        return RuntimeError(
            f"a collective failed at step {self.step} (rank {self.rank}; "
            f"train.collective_timeout_s={self.cfg.train.collective_timeout_s:g}): "
            f"{str(error).strip().splitlines()[-1]}; the job's hosts were {hosts}: a rank "
            f"or host was lost. Requeue or rerun the same command: it resumes from "
            f"{tag or 'the start'} in the same MLflow run"
        )

    @contextmanager
    def _host_metrics(self) -> Iterator[None]:
        """Each host's first rank samples CPU/memory/GPU into the run (pipeline.sysmetrics)."""
        from pipeline import sysmetrics
        from pipeline.tracking import resolve_uri

        # All ranks participate: only rank 0 knows the run id.
        run_id = distributed.on_main(lambda: self.tracker.run_id)
        uri = resolve_uri(self.cfg.tracking)
        local_rank = distributed.get_local_rank()
        # A SQLite file is written by rank 0's host only: several hosts writing one file over
        # a network filesystem can corrupt it.
        if not uri.startswith(("http://", "https://")) and not self.is_main:
            local_rank = -1
        handle = sysmetrics.start(
            run_id,
            tracking_uri=uri,
            local_rank=local_rank,
            interval_s=self.cfg.tracking.system_metrics_interval_s,
        )
        try:
            yield
        finally:
            handle.stop()  # before the run ends: it writes the queued samples

    def _announce(self) -> None:
        from pipeline.tracking import run_page
        from pipeline.train.engine import describe

        if self.is_main:  # a file write; no collective in here
            save_config(self.cfg, self.run_dir.config)
        self.tracker.log_artifact(self.run_dir.config)
        tcfg = self.cfg.train
        resumed = self.resumed_from is not None
        log.info(
            "training %d steps (%d epochs x %d), %d ranks x %d images, %s%s",
            *(self.total_steps, tcfg.epochs, self.steps_per_epoch, self.world, self.batch_size),
            describe(self.engine),
            f"; resumed at step {self.step} from {self.run_dir.checkpoints}" if resumed else "",
        )
        if self.tracker.run_id:
            page = run_page(self.tracker.uri, self.tracker.experiment_id, self.tracker.run_id)
            log.info("MLflow run %s: %s", self.tracker.run_id, page)

    def finish(self) -> dict[str, Any]:
        """Final evaluation (files in the eval directory), weights, result and curves;
        returns the result. All ranks participate."""
        from pipeline.model import save_weights
        from pipeline.tracking import log_curves
        from pipeline.train.engine import fp32_state_dict

        # All ranks participate in the final evaluation.
        final = self.evaluator.evaluate(self.step, output_dir=eval_output_dir(self.cfg))
        log.info("final evaluation at step %d: %s", self.step, final)
        state = fp32_state_dict(self.engine)
        result = {
            "step": self.step,
            "run_id": self.tracker.run_id or self.run_id,
            "tracking_uri": self.tracker.uri,
            "metrics": final,
            "weights": str(self.run_dir.weights),
            "resumed_from": self.resumed_from,
            "output_dir": str(self.run_dir.root),
        }
        if self.is_main:  # files only; no collective in here
            save_weights(state, self.engine.module.architecture, self.run_dir.weights)
            self.tracker.log_artifact(self.run_dir.weights)
            log_curves(self.tracker, CURVES, self.run_dir.curves)
            self._log_model()
            self.run_dir.write_result(result)
        return result

    def _log_model(self) -> None:
        """Rank 0: the model as an MLflow model, registered under tracking.register_model.
        Tracking never stops training: a failure is reported with the command to redo it."""
        name = self.cfg.tracking.register_model
        if not (name and self.tracker.run_id):
            return
        from pipeline.export import log_mlflow_model

        try:
            logged = log_mlflow_model(
                self.engine.module,
                self.cfg.data,
                tracking_uri=self.tracker.uri,
                run_id=self.tracker.run_id,
                registered_model_name=name,
            )
            log.info("MLflow model %s version %s: %s", name, logged.version, logged.model_uri)
        except Exception as e:
            log.error(
                "could not log the model to MLflow (%s: %s); the weights are in %s: register "
                "them later with `pipeline export --config %s checkpoint=%s --mlflow "
                "--register-model %s`",
                *(type(e).__name__, e, self.run_dir.weights, self.run_dir.config),
                *(self.run_dir.weights, name),
            )

    def close(self) -> None:
        """End the MLflow run (FINISHED) without training, e.g. after benchmarking steps."""
        self._session.close()
        self._release_lock()
