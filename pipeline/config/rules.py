"""Rules across config sections: each broken rule raises a one-line ConfigError naming the keys,
values, rule and fix. Rules that need the shards or the world size are in :mod:`pipeline.preflight`.

Loading a config (:func:`pipeline.config.load.load_config`) parses and type-checks it only; these
rules consult the components they are about (the dealing of shards to data workers, the
evaluation protocols, the BatchNorm policy), so they sit above them, and every entry point
applies them through :func:`load_checked`: the CLI for each command that names a config, the
SLURM launcher before it submits, the demo.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config.deepspeed import read_deepspeed_file
from pipeline.config.load import load_config
from pipeline.config.runconfig import RunConfig
from pipeline.config.schema import ConfigError
from pipeline.data.dealing import streams_per_rank
from pipeline.eval.protocols import check_config as check_protocols
from pipeline.train.batchnorm import check_config as check_batchnorm


def load_checked(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """The config of ``path`` and ``overrides`` (:func:`load_config`), checked by :func:`check`:
    what an entry point runs before anything else."""
    cfg = load_config(path, overrides)
    check(cfg)
    return cfg


def check(cfg: RunConfig) -> None:
    """Rules across sections, checked before any engine, data or job starts:
    each broken rule raises a one-line ConfigError naming the keys, values, rule and fix.

    Rules that need the shards or the world size are in :mod:`pipeline.preflight`.
    """
    data, sampler, train, model, launch = cfg.data, cfg.sampler, cfg.train, cfg.model, cfg.launch
    # pipeline.data.stream: each DataLoader worker owns whole P x K streams (the rule lives
    # with the dealing of shards to streams).

    try:
        streams_per_rank(data, sampler)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # The BatchNorm policy's own rules (frozen vs synchronised, the gradient cache's chunks).
    check_batchnorm(
        model, chunk_size=train.chunk_size, batch_size_per_gpu=sampler.batch_size_per_gpu
    )
    read_deepspeed_file(train)
    # Each evaluation protocol's rules live with the protocol (pipeline.eval.protocols).
    check_protocols(cfg)
    if launch.gpus_per_node and launch.tasks_per_node > launch.gpus_per_node:
        raise ConfigError(
            f"launch.tasks_per_node={launch.tasks_per_node} with launch.gpus_per_node="
            f"{launch.gpus_per_node}: every task (rank) needs a GPU of its own; set "
            f"launch.tasks_per_node<={launch.gpus_per_node} (0: one per GPU)"
        )
