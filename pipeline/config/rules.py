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
from pipeline.config.schema import ConfigError, RunConfig
from pipeline.data.dealing import streams_per_rank


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
    data, sampler, train, model, ev, launch = (
        cfg.data,
        cfg.sampler,
        cfg.train,
        cfg.model,
        cfg.eval,
        cfg.launch,
    )
    # pipeline.data.stream: each DataLoader worker owns whole P x K streams (the rule lives
    # with the dealing of shards to streams).

    try:
        streams_per_rank(data, sampler)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if model.sync_bn and model.freeze_bn:
        raise ConfigError(
            "model.sync_bn=true with model.freeze_bn=true: frozen BatchNorm has no batch "
            "statistics to synchronise; set model.freeze_bn=false to train BatchNorm, or "
            "model.sync_bn=false"
        )
    batch = sampler.batch_size_per_gpu
    chunk = train.chunk_size
    # pipeline.train.gradcache cuts the local batch into chunks of train.chunk_size; a last
    # chunk of one image cannot be normalised by a BatchNorm in training mode.
    if 0 < chunk < batch and (chunk == 1 or batch % chunk == 1) and not model.freeze_bn:
        fits = [c for c in range(max(chunk, 2), batch) if batch % c != 1][:1] or [0]
        raise ConfigError(
            f"train.chunk_size={chunk} cuts the per-GPU batch of {batch} images "
            f"(sampler.classes_per_batch x sampler.samples_per_class) into chunks of which "
            f"{'every one' if chunk == 1 else 'the last'} holds 1 image, and BatchNorm in "
            "training mode fails on a single image "
            f"(model.freeze_bn=false); choose a chunk size that leaves no 1-image chunk "
            f"(e.g. train.chunk_size={fits[0]}) or set model.freeze_bn=true"
        )
    read_deepspeed_file(train)
    if ev.ijbc_protocol and ev.protocol != "ijbc":
        raise ConfigError(
            f"eval.ijbc_protocol={ev.ijbc_protocol!r} is set but eval.protocol={ev.protocol!r} "
            "never reads it; set eval.protocol=ijbc or eval.ijbc_protocol=''"
        )
    if ev.protocol == "ijbc" and not ev.ijbc_protocol and _is_remote(data.eval_urls):
        raise ConfigError(
            f"eval.protocol=ijbc with remote data.eval_urls={data.eval_urls!r}: the IJB-C pair "
            "lists and index.parquet are read from a local directory; copy the split's "
            "pairs.parquet and index.parquet locally and set eval.ijbc_protocol=DIR"
        )
    if launch.gpus_per_node and launch.tasks_per_node > launch.gpus_per_node:
        raise ConfigError(
            f"launch.tasks_per_node={launch.tasks_per_node} with launch.gpus_per_node="
            f"{launch.gpus_per_node}: every task (rank) needs a GPU of its own; set "
            f"launch.tasks_per_node<={launch.gpus_per_node} (0: one per GPU)"
        )


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")
