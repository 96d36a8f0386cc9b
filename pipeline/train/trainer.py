"""``pipeline train``: Smooth-AP training with DeepSpeed, one process, torchrun or srun.

The same call resumes: :func:`train` restores the latest checkpoint of ``train.output_dir``
(weights, optimizer, schedule, step and data position), continues its MLflow run and
finishes the remaining steps; on a finished run it returns the recorded result.

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
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.config import RunConfig, to_dict
from pipeline.config_loader import eval_output_dir, flatten, load_config, save_config
from pipeline.train import checkpoint

RUN_ID_FILE = "mlflow_run.txt"
RESULT_FILE = "result.json"
WEIGHTS_FILE = "model.safetensors"
CLIENT_STATE_VERSION = 1

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
    result = train(cfg)
    if distributed.is_main_process():
        print(json.dumps({k: result[k] for k in ("step", "metrics", "weights", "run_id")}))
    distributed.destroy()
    return 0


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


def _check_chunking(model: torch.nn.Module, cfg: RunConfig) -> None:
    chunk = cfg.train.chunk_size
    if chunk and chunk < cfg.sampler.batch_size_per_gpu and not cfg.model.freeze_bn:
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if has_bn:
            warnings.warn(
                f"train.chunk_size={chunk} with model.freeze_bn=false: BatchNorm normalises each "
                "chunk with its own statistics (and updates running statistics twice), so the "
                "gradient cache is not exactly the full-batch gradient; set model.freeze_bn=true "
                "for exact gradients",
                stacklevel=2,
            )


def _read_run_id(out: Path) -> str | None:
    path = out / RUN_ID_FILE
    return path.read_text().strip() or None if path.is_file() else None


class _Window:
    """Timings since the last log: data wait, step time, images."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.data_s = self.total_s = 0.0
        self.steps = self.images = 0

    def add(self, data_s: float, total_s: float, images: int) -> None:
        self.data_s += data_s
        self.total_s += total_s
        self.steps += 1
        self.images += images

    def metrics(self) -> dict[str, float]:
        total = max(self.total_s, 1e-9)
        return {
            "train/images_per_s": self.images / total,
            "train/data_wait_frac": self.data_s / total,
            "train/step_time_s": total / max(self.steps, 1),
        }


def _evaluate(
    model: torch.nn.Module,
    cfg: RunConfig,
    device: torch.device,
    *,
    progress: bool,
    output_dir: Path | None = None,
) -> dict[str, float]:
    """Retrieval metrics of ``model`` on ``data.eval_urls`` (pipeline.eval.evaluator); with
    ``output_dir``, also the embeddings, metrics.json and figure there. All ranks participate."""
    from pipeline.eval.evaluator import evaluate_model

    was_training = model.training
    model.eval()
    try:
        metrics = evaluate_model(
            model, cfg.data, cfg.eval, device=device, output_dir=output_dir, progress=progress
        )
    finally:
        model.train(was_training)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------------------- the loop


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes; returns its result on every rank.

    Runs on every rank of the job (reads the rank environment through
    ``pipeline.distributed.init``). The result: ``step``, ``run_id`` (MLflow, rank 0),
    ``tracking_uri``, ``metrics`` (final evaluation), ``weights`` (fp32 ``.safetensors``),
    ``resumed_from`` (step or None), ``output_dir``.
    """
    from tqdm import tqdm

    from pipeline.data.stream import train_loader
    from pipeline.data.transforms import normalise_batch
    from pipeline.loss import SmoothAPLoss
    from pipeline.model import build_model, save_weights
    from pipeline.tracking import log_curves, make_tracker, ui_command
    from pipeline.train.engine import (
        build_engine,
        describe,
        fp32_state_dict,
        grad_norm,
        reported_grad_norm,
    )
    from pipeline.train.gradcache import forward_backward
    from pipeline.train.optim import build_optimizer, build_scheduler

    tcfg = cfg.train
    distributed.init()
    _set_determinism(tcfg.deterministic)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)  # rank-0 output, decided once
    out = Path(tcfg.output_dir)
    ckpt_root = out / "checkpoints"
    spe = cfg.sampler.steps_per_epoch
    total_steps = tcfg.epochs * spe
    batch = cfg.sampler.batch_size_per_gpu

    torch.manual_seed(tcfg.seed)
    model = build_model(cfg.model)
    _check_chunking(model, cfg)
    optimizer = build_optimizer(model, cfg.optim, cfg.model.head_lr_mult)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    # All ranks participate (process group, weight broadcast).
    engine = build_engine(model, optimizer, scheduler, tcfg, batch)
    checkpoint.install_safe_loading(engine)
    device = engine.device
    on_gpu = torch.device(device).type == "cuda"

    # All ranks participate: DeepSpeed loads every rank's partitions.
    client = checkpoint.load_latest(engine, ckpt_root, model.architecture)
    step = int(client["step"]) if client else 0
    if client and int(client.get("world_size", world)) != world:
        say(
            f"warning: the checkpoint was written by {client['world_size']} ranks, this job has "
            f"{world}: training continues, but the data stream differs from an uninterrupted run",
            file=sys.stderr,
        )
    run_id = (client or {}).get("mlflow_run_id") or _read_run_id(out)
    if step >= total_steps and (out / RESULT_FILE).is_file():
        say(f"{out}: already trained ({step} steps); result in {out / RESULT_FILE}")
        return json.loads((out / RESULT_FILE).read_text())

    tracker = make_tracker(cfg.tracking, is_main=is_main, run_id=run_id)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if tracker.run_id:
            (out / RUN_ID_FILE).write_text(tracker.run_id)
        tracker.log_params(flatten(to_dict(cfg)))
        tracker.log_artifact(out / "config.yaml")
    tracker.set_tags({"world_size": str(world), "engine": describe(engine)})
    say(
        f"training {total_steps} steps ({tcfg.epochs} epochs x {spe}), {world} ranks x {batch} "
        f"images, {describe(engine)}"
        + (f"; resumed at step {step} from {ckpt_root}" if client else "")
    )
    if tracker.run_id:
        say(f"MLflow run {tracker.run_id}: {ui_command(tracker.uri)}")

    loss_fn = SmoothAPLoss(
        cfg.loss.temperature, cfg.loss.query_in_positives, cfg.loss.query_chunk_size
    )
    resumed_from = step if client else None
    window = _Window()
    progress = tqdm(
        total=total_steps, initial=step, disable=not is_main, desc="train", mininterval=2.0
    )
    status = "FAILED"
    try:
        engine.train()
        while step < total_steps:
            epoch, start = divmod(step, spe)
            batches = iter(
                train_loader(
                    cfg.data,
                    cfg.sampler,
                    rank=rank,
                    world_size=world,
                    epoch=epoch,
                    start_step=start,
                    # On a GPU the workers ship uint8 and the device normalises: a 4x
                    # smaller batch through shared memory and over PCIe.
                    normalise=not on_gpu,
                )
            )
            for _ in range(start, spe):
                t0 = time.perf_counter()
                item = next(batches, None)
                if item is None:
                    raise RuntimeError(
                        f"the training stream of rank {rank} ended at step {step} of epoch "
                        f"{epoch}, before sampler.steps_per_epoch={spe}: every rank must yield "
                        "the same number of batches (pipeline.data.stream.train_loader)"
                    )
                images, labels = item
                t_data = time.perf_counter() - t0
                # Per-step reseeding makes a resumed step draw the same random numbers.
                torch.manual_seed(_step_seed(tcfg.seed, rank, step))
                images = images.to(device, non_blocking=True)
                if on_gpu:
                    images = normalise_batch(images)
                labels = labels.to(device, non_blocking=True)
                # All ranks participate (the loss gathers; DeepSpeed reduces gradients).
                loss = forward_backward(
                    engine,
                    images,
                    labels,
                    loss_fn,
                    chunk_size=tcfg.chunk_size,
                    backward=engine.backward,
                    set_boundary=engine.set_gradient_accumulation_boundary,
                )
                norm_before = grad_norm(engine)
                lr = scheduler.get_last_lr()[0]
                engine.step()
                step += 1
                window.add(t_data, time.perf_counter() - t0, batch * world)
                progress.update(1)

                if step % tcfg.log_every == 0 or step == total_steps:
                    # All ranks participate: the mean of the ranks' losses is the loss of
                    # the global batch (pipeline.loss).
                    mean_loss = float(distributed.all_reduce_sum(loss.float())) / world
                    metrics = {"train/loss": mean_loss, "train/lr": lr, **window.metrics()}
                    norm = reported_grad_norm(engine, norm_before)
                    if norm is not None:
                        metrics["train/grad_norm"] = norm
                    tracker.log_metrics(metrics, step)
                    progress.set_postfix(
                        loss=f"{mean_loss:.4f}",
                        img_s=f"{metrics['train/images_per_s']:.0f}",
                        refresh=False,
                    )
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(
                            f"loss is {mean_loss} at step {step}: lower optim.lr, or check "
                            "train.gradient_clipping and the data"
                        )
                    window.reset()
                if cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
                    # All ranks participate in the evaluation.
                    metrics = _evaluate(engine.module, cfg, device, progress=is_main)
                    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
                    say(f"step {step}: {metrics}")
                if step % tcfg.checkpoint_every == 0 or step == total_steps:
                    client_state = {
                        "version": CLIENT_STATE_VERSION,
                        "step": step,
                        "epoch": step // spe,
                        "step_in_epoch": step % spe,
                        "sampler_seed": cfg.sampler.seed,
                        "train_seed": tcfg.seed,  # the RNG state: reseeded from (seed, rank, step)
                        "world_size": world,
                        "mlflow_run_id": tracker.run_id or run_id or "",
                        "architecture": engine.module.architecture,
                    }
                    # All ranks participate (collective save).
                    checkpoint.save(engine, ckpt_root, step, client_state, tcfg.keep_checkpoints)
        progress.close()

        # All ranks participate in the final evaluation.
        eval_dir = eval_output_dir(cfg)
        final = _evaluate(engine.module, cfg, device, progress=is_main, output_dir=eval_dir)
        tracker.log_metrics({f"eval/{k}": v for k, v in final.items()}, step)
        for name in ("metrics.json", "retrieval_grid.png", "roc.png"):
            if (eval_dir / name).is_file():
                tracker.log_artifact(eval_dir / name, "eval")
        say(f"final evaluation at step {step}: {final}")
        state = fp32_state_dict(engine)
        weights = out / WEIGHTS_FILE
        result = {
            "step": step,
            "run_id": tracker.run_id or run_id,
            "tracking_uri": tracker.uri,
            "metrics": final,
            "weights": str(weights),
            "resumed_from": resumed_from,
            "output_dir": str(out),
        }
        if is_main:
            save_weights(state, engine.module.architecture, weights)
            tracker.log_artifact(weights)
            log_curves(tracker, CURVES, out / "curves.png")
            (out / RESULT_FILE).write_text(json.dumps(result, indent=1))
        status = "FINISHED"
    finally:
        progress.close()
        tracker.finish(status)
    # All ranks participate: nobody leaves before rank 0 has written the result.
    distributed.barrier()
    return result
