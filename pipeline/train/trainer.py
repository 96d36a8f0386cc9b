"""The training loop and step: :class:`Trainer`.

A Trainer receives the config adapted to its plan (pipeline.train.plan) and its built parts
(pipeline.train.build), inside the job's process group and under the run lock, both held by
pipeline.train.entry. It resumes from the plan's checkpoint (weights, optimizer, schedule,
step, data position, the loss's state, MLflow run); what runs beside the step is a hook
(pipeline.train.hooks).

Reproducibility: initial weights come from ``train.seed`` (DeepSpeed broadcasts rank 0's);
the batches from (``sampler.seed``, epoch, rank, world size, step) (pipeline.data.stream);
every step reseeds torch's generators from (``train.seed``, rank, step), so dropout and
augmentation-free randomness do not depend on what ran before. With
``train.deterministic`` on CPU, a run killed and resumed ends with the same weights as an
uninterrupted one (tests/test_train_resume.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch

from pipeline.config.runconfig import RunConfig
from pipeline.data import stream
from pipeline.data.transforms import normalise_batch
from pipeline.distributed import collectives, group
from pipeline.loss import loss_state
from pipeline.rundir import RunDir
from pipeline.train import checkpoint, faults, hooks
from pipeline.train.build import TrainParts
from pipeline.train.checkpoint import TrainState
from pipeline.train.engine import grad_norm, reported_grad_norm
from pipeline.train.gradcache import forward_backward
from pipeline.train.plan import RunPlan
from pipeline.train.signals import StopRequest
from pipeline.weights import check_finite

log = logging.getLogger(__name__)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _then(fn: Callable, on_phase: Callable[[str], None], name: str) -> Callable:
    """``fn`` followed by ``on_phase(name)`` (phase timing for benchmarks)."""

    def call(*args: Any) -> Any:
        out = fn(*args)
        on_phase(name)
        return out

    return call


class Trainer:
    """One training run: the loop and the step. Every method runs on every rank.

    ``cfg`` is the config adapted to ``plan`` (``plan.apply``); ``parts`` come from
    :func:`pipeline.train.build.build_components`. Construction resumes from the plan's
    checkpoint and opens the tracking run; use it as a context manager (or call
    :meth:`close`) so that the run ends with the status the block ends with.
    """

    def __init__(self, cfg: RunConfig, plan: RunPlan, parts: TrainParts) -> None:
        # The entry point owns the process group (pipeline.distributed.group.process_group; the engine
        # made the group of one a single process needs); a trainer never creates one.
        assert torch.distributed.is_initialized(), "build_components(cfg, plan) first"
        assert group.get_world_size() == plan.world_size, "a plan of another job"
        assert cfg.sampler.classes_per_batch == plan.classes_per_batch, "pass plan.apply(cfg)"
        self.cfg, self.plan, self.parts = cfg, plan, parts
        self.engine, self.loss_fn, self.scheduler = parts.engine, parts.loss, parts.scheduler
        self.loss_state = loss_state(parts.loss)
        self.rank, self.world = group.get_rank(), plan.world_size
        self.is_main = self.rank == 0
        self.run_dir = RunDir.of(cfg)
        self.hosts = collectives.rank_hosts()  # named when a rank or host is lost
        self.steps_per_epoch = cfg.sampler.steps_per_epoch
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.batch_size = cfg.sampler.batch_size_per_gpu
        self.device = self.engine.device
        self.on_gpu = torch.device(self.device).type == "cuda"
        self.chunked = 0 < cfg.train.chunk_size < self.batch_size
        self._resume(plan.resume_tag)
        # The plan says finished only when the config trains nothing new (pipeline.train.finished):
        # then the recorded result stands, whatever step the checkpoints reached.
        self.done = plan.finished
        with ExitStack() as stack:
            session = hooks.tracking(cfg, self.engine, world=self.world, done=self.done)
            self.tracker = stack.enter_context(session)
            self._make_hooks(stack)
            # Closed by close() (or the with block), with the status the run ended with.
            self._session = stack.pop_all()

    def _resume(self, tag: str | None) -> None:
        # All ranks participate: DeepSpeed loads every rank's partitions.
        root, module = self.run_dir.checkpoints, self.engine.module
        state = checkpoint.resume(self.engine, root, module.architecture, tag, self.loss_state)
        if state is not None:  # a diverged run can checkpoint between two logged losses
            check_finite(module.state_dict(), f"checkpoint {root / checkpoint.tag_for(state.step)}")
        # All ranks participate: a checkpoint holds rank 0's BatchNorm statistics only.
        self.parts.batchnorm.after_resume(module)
        self.step = state.step if state else 0
        self.resumed_from = self.step if state else None
        if self.is_main and state and state.mlflow_run_id and not self.run_dir.read_run_id():
            # A run directory from before mlflow_run.txt recorded the MLflow run in its
            # checkpoints only: recorded where the tracking session looks, it is continued.
            self.run_dir.write_run_id(state.mlflow_run_id)

    def _make_hooks(self, stack: ExitStack) -> None:
        cfg, engine, tracker, total = self.cfg, self.engine, self.tracker, self.total_steps
        self.metrics = hooks.MetricLogger(
            tracker,
            log_every=cfg.train.log_every,
            total_steps=total,
            start_step=self.step,
            show=self.is_main and not self.done,
        )
        stack.callback(self.metrics.close)
        self.evaluator = hooks.EvalHook(cfg, engine, tracker, total_steps=total)
        self.checkpointer = hooks.Checkpointer(
            engine,
            self.run_dir,
            every=cfg.train.checkpoint_every,
            keep=cfg.train.keep_checkpoints,
            total_steps=total,
            state_at=self.train_state,
            loss_state=self.loss_state,
        )
        self.final = hooks.FinalExport(cfg, engine, tracker, self.evaluator)
        self.final.resumed_from = self.resumed_from
        self.hooks: list[hooks.Hook] = [self.metrics, self.evaluator, self.checkpointer]

    def train_state(self, step: int) -> TrainState:
        """What a checkpoint at ``step`` records besides weights, optimizer and loss state."""
        return TrainState(
            step=step,
            epoch=step // self.steps_per_epoch,
            step_in_epoch=step % self.steps_per_epoch,
            sampler_seed=self.cfg.sampler.seed,
            train_seed=self.cfg.train.seed,  # the RNG state: reseeded from (seed, rank, step)
            world_size=self.world,
            architecture=self.engine.module.architecture,
            mlflow_run_id=self.tracker.run_id or "",  # the run these steps were logged to
        )

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches from the current step to the last, epoch by epoch."""
        # On a GPU the workers ship uint8 and the device normalises: a 4x smaller batch
        # through shared memory and over PCIe.
        return stream.train_batches(
            self.cfg.data,
            self.cfg.sampler,
            rank=self.rank,
            world_size=self.world,
            step=self.step,
            total_steps=self.total_steps,
            normalise=not self.on_gpu,
        )

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
        self.parts.batchnorm.after_step(engine.module)
        self.step += 1
        if self.loss_state is not None:
            self.loss_state.after_step(self.step)
        if on_phase is not None:
            on_phase("optimizer")
        norm = reported_grad_norm(engine, norm_before)
        self.metrics.record(loss, lr=lr, grad_norm=norm, images=self.batch_size * self.world)
        return loss

    def train(self) -> dict[str, Any]:
        """Train to the last step, then the final export; returns the result on every rank."""
        if self.done:
            log.info(
                "%s: already trained (%d steps); result in %s",
                *(self.run_dir.root, self.step, self.run_dir.result),
            )
            return self.run_dir.read_result()
        # Ends the MLflow run FINISHED, KILLED or FAILED with the way this block ends.
        with self._session:
            host_metrics = hooks.HostMetrics(self.cfg, self.tracker)
            try:
                hooks.announce(self.cfg, self.tracker, self.engine, self.step, self.resumed_from)
                if self.plan.continued_from is not None:  # trained on after it had finished
                    self.tracker.set_tags({"continued_from_step": str(self.plan.continued_from)})
                self._loop()
                checkpoint.mark_final(self.run_dir.checkpoints, self.step)  # never pruned
                self.metrics.close()
                result = self.final.maybe(self.step)
            finally:
                host_metrics.close()  # before the run ends: it writes the queued samples
        # All ranks participate: nobody leaves before rank 0 has written the result.
        collectives.barrier()
        return result

    def _loop(self) -> None:
        """Steps to the last one; a SIGTERM/SIGUSR1 on any rank ends it after a checkpoint
        (pipeline.train.signals), a lost rank with an error naming the hosts.

        The steady steps run under train.step_timeout_s, so that a lost host ends the job
        within about that long; the hooks' slow work (evaluation, checkpoints) switches to
        the long timeout itself (pipeline.train.hooks), and so does what follows the loop."""
        self.engine.train()
        batches = self._batches()
        first_step = self.step
        with StopRequest(grace_s=self.cfg.train.stop_grace_s) as stop:
            try:
                while self.step < self.total_steps:
                    faults.set_step_timeout(
                        self.cfg.train, self.step, first_step, self.steps_per_epoch
                    )
                    if self._step_and_hooks(batches, stop):
                        self._stop(stop)
            finally:
                # The final export and the end of the MLflow run are rank 0's slow work.
                group.set_timeout(None)

    def _step_and_hooks(self, batches: Iterator, stop: StopRequest) -> bool:
        """One step and the hooks after it; whether any rank has been asked to stop."""
        t0 = time.perf_counter()
        images, labels = next(batches)
        data_s = time.perf_counter() - t0
        try:
            self.train_step(images, labels)
            self.metrics.add_time(data_s, time.perf_counter() - t0)
            for hook in self.hooks:
                hook.maybe(self.step)
            # All ranks participate: the ranks receive a signal at different moments.
            return collectives.any_rank(stop.requested)
        except Exception as e:  # gloo's timeouts are plain RuntimeErrors
            if not group.is_collective_error(e):
                raise
            root = self.run_dir.checkpoints
            raise faults.lost_rank_error(e, self.step, self.rank, self.hosts, root) from e

    def _stop(self, stop: StopRequest) -> None:
        # The run's end (its MLflow status, the run lock) follows the loop: the launcher's
        # last death signal must not cut it short.
        stop.until_exit()
        if self.checkpointer.saved_step != self.step:
            self.checkpointer.save(self.step)  # all ranks participate (collective save)
        log.warning(
            "stopping at step %d on %s: checkpoint written; run the same command to resume",
            self.step,
            stop.name or "a signal to another rank",
        )
        raise SystemExit(128 + (stop.signum or 15))

    def close(self) -> None:
        """End the MLflow run (FINISHED) without training, e.g. after benchmarking steps."""
        self._session.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._session.__exit__(*exc)
