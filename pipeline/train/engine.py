"""The DeepSpeed engine of a training run: its config, creation and fp32 weight export.

DeepSpeed gets a torch optimizer and ``LambdaLR`` (pipeline.train.optim) and a config generated
from ``train.*``: ZeRO stage, precision (bf16 on GPU, fp32 on CPU when 'auto'), explicit
gradient clipping, one micro-batch per step. ``train.deepspeed_config`` adds tuning settings
(bucket sizes, overlap, communication logging) from a YAML/JSON file; it may not contradict
the keys the pipeline derives from its own config.

bf16 is DeepSpeed's ``torch_autocast`` mode: weights, gradients, their all-reduce and the
optimizer stay fp32, and the forward runs under ``torch.autocast(bfloat16)``. DeepSpeed's
``bf16`` mode instead casts the module to bf16, which breaks frozen BatchNorm (its fp32
parameters are not the optimizer's, so they stay fp32 beside bf16 activations) and would
reduce the small Smooth-AP gradients in bf16.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config.deepspeed import read_deepspeed_file
from pipeline.config.schema import ConfigError
from pipeline.config.schema_train import TrainConfig
from pipeline.distributed import group


def use_bf16(train_cfg: TrainConfig) -> bool:
    """bf16 when asked, or on 'auto' with CUDA; fp32 on CPU ('auto')."""
    if train_cfg.precision == "auto":
        return torch.cuda.is_available()
    return train_cfg.precision == "bf16"


def deepspeed_config(train_cfg: TrainConfig, batch_size_per_gpu: int, world_size: int) -> dict:
    """The DeepSpeed config dict of a run (see the module doc)."""
    bf16 = use_bf16(train_cfg)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size_per_gpu,
        "train_batch_size": batch_size_per_gpu * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train_cfg.gradient_clipping,
        "zero_optimization": {"stage": train_cfg.zero_stage},
        # Our torch optimizers (Adam, AdamW, SGD): SGD is outside DeepSpeed's tested list.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,  # the pipeline logs progress itself
        "wall_clock_breakdown": False,
    }
    if bf16:
        # No "lower precision safe" modules: every gradient is communicated in fp32.
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        }
    _merge_user_config(config, train_cfg)
    return config


def _merge_user_config(config: dict, train_cfg: TrainConfig) -> None:
    """Merge ``train.deepspeed_config`` (checked by pipeline.config.deepspeed) into ``config``."""
    extra = read_deepspeed_file(train_cfg)
    if "torch_autocast" in extra and "torch_autocast" not in config:
        raise ConfigError(
            f"train.deepspeed_config={train_cfg.deepspeed_config!r} sets torch_autocast, but "
            f"train.precision={train_cfg.precision!r} runs in fp32 on this machine (no CUDA); "
            "set train.precision=bf16 or use a file without torch_autocast"
        )
    for name, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value


def use_private_extension_dir() -> None:
    """Keep DeepSpeed's JIT-compiled ops inside this Python environment (TORCH_EXTENSIONS_DIR),
    unless the user chose a directory.

    On the CPU accelerator every DeepSpeed start-up loads ``deepspeed_shm_comm``, compiled on
    first use into torch's extension cache, by default one directory per user
    (``~/.cache/torch_extensions/py311_<variant>/deepspeed_shm_comm``) shared by every
    checkout. Its build file records the environment's absolute paths, so two checkouts with
    different virtual environments (a CI clone beside a working copy) rebuild the same .so in
    turn, and GNU ld rewrites it in place (same inode): a rank that loads it meanwhile fails
    with ``ImportError: ... file too short`` or ``invalid ELF header`` (reproduced with a
    relink loop beside the 2-process DeepSpeed test). One directory per environment
    makes the build deterministic: it is compiled once (``make venv`` does it, see
    :func:`build_cpu_ops`) and never rewritten by another checkout.
    """
    if "TORCH_EXTENSIONS_DIR" in os.environ or not os.access(sys.prefix, os.W_OK):
        return
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")


def build_cpu_ops() -> None:
    """Compile (or find) DeepSpeed's CPU communication op now, in one process, so that ranks
    only load it at run time; ``make venv`` calls it. Nothing to do on a GPU machine."""
    use_private_extension_dir()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and get_accelerator().device_name() == "cpu":
        builder.load(verbose=False)


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_cfg: TrainConfig,
    batch_size_per_gpu: int,
) -> Any:
    """A DeepSpeed engine around ``model`` (moved to this rank's device). All ranks
    participate (DeepSpeed broadcasts rank 0's initial weights)."""
    group.ensure_process_group()
    use_private_extension_dir()  # before DeepSpeed loads its CPU comm op
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    model.to(group.device())
    config = deepspeed_config(train_cfg, batch_size_per_gpu, dist.get_world_size())
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine


def grad_norm(engine: Any) -> float | None:
    """The global gradient 2-norm before clipping, read after backward and before
    ``engine.step()``. DeepSpeed reports it for ZeRO and bf16 after the step; for plain fp32
    (ZeRO 0) it does not, and the gradients on each rank are already the reduced ones."""
    if engine.zero_optimization():
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def reported_grad_norm(engine: Any, before_step: float | None) -> float | None:
    norm = engine.get_global_grad_norm() if before_step is None else before_step
    return None if norm is None else float(norm)


def fp32_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The module's state dict in fp32 on the CPU (ZeRO 0-2 keep full fp32 weights on every
    rank; bf16 only changes the forward's compute dtype)."""
    return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def describe(engine: Any) -> str:
    """One line: ZeRO stage, precision, ranks, optimizer wrapper."""
    return json.dumps(
        {
            "zero_stage": engine.zero_optimization_stage(),
            "precision": "bf16-autocast" if engine.torch_autocast_enabled() else "fp32",
            "world_size": dist.get_world_size(),
            "optimizer": type(engine.optimizer).__name__,
        }
    )
