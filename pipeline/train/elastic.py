"""Elastic resume: a checkpoint written by N ranks continues on M ranks (ZeRO 0, 1 and 2).

What changes with the number of ranks, and what does not:

- ZeRO 0 keeps the whole optimizer state in ``mp_rank_00_model_states.pt``; DeepSpeed loads
  it on any number of ranks.
- ZeRO 1/2 split the fp32 master weights and the optimizer state (Adam/AdamW moments, SGD
  momentum) into one flat partition per rank and parameter group
  (``zero_pp_rank_{r}_mp_rank_00_optim_states.pt``). DeepSpeed refuses those on another world
  size ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is
  not currently supported"). :func:`load` re-partitions them: each new rank reads the old
  partitions and copies, element for element, the parts of every parameter that fall in its new
  partition. Values are copied, never recomputed, so the restore is bitwise.
- The global batch is kept: P per rank becomes (old P x old ranks) / new ranks
  (:func:`classes_per_batch_for`), so the optimizer step count, the schedule and the number
  of images per step are unchanged. The data stream continues at the same global step
  (:func:`stream_position`), with another sample order for the rest of that epoch.

Why not DeepSpeed's universal checkpoint (``ds_to_universal`` + ``checkpoint.load_universal``):
it reads every file with ``torch.load(weights_only=False)``, at conversion and again in the
engine's load (``universal_checkpoint.py``, outside the checkpoint engine, so
``checkpoint.SafeTorchCheckpointEngine`` cannot cover it): loading a checkpoint could run
arbitrary pickled code. It also needs an offline conversion step that writes a second full copy
of the state (one file per parameter and state key), refuses a plain ``nn.Module`` checkpoint
unless given ``--inject_missing_state``, and does not cover ZeRO 0. Here the old files are
read with ``safe_load.safe_load`` (``weights_only=True``), nothing is converted or written, and
every checkpoint already on disk resumes elastically.

Cost: each new rank reads the old partition files one at a time (peak memory: its own new
partition plus one old file, e.g. 10 GB / N for a 10 GB state); the total bytes read are
(new ranks) x (state size), once per resume. Robustness: the reader depends on five keys of
DeepSpeed's ZeRO 1/2 file layout (``deepspeed.checkpoint.constants``, the entries
``ds_to_universal`` itself reads) and on the engine's partition mapping
(``_hp_mapping``, which DeepSpeed's public ``safe_get_full_*`` API is built on); a missing key
fails with an error naming it, and tests/test_elastic.py checks exactness on every upgrade.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config.schema import ConfigError
from pipeline.distributed import collectives
from pipeline.distributed.group import get_world_size
from pipeline.errors import UserError
from pipeline.train.safe_load import safe_load

MODEL_STATES = "mp_rank_00_model_states.pt"

# DeepSpeed 0.19 deepspeed.checkpoint.constants (spelled out: importing the module pulls in
# nothing else, but a rename there must fail here with a clear message, not an ImportError).
_OPTIMIZER_STATE_DICT = "optimizer_state_dict"
_FP32_PARTITIONS = "single_partition_of_fp32_groups"
_BASE_OPTIMIZER_STATE = "base_optimizer_state"
_SLICE_MAPPINGS = "param_slice_mappings"
_GROUP_PADDINGS = "group_paddings"


class ElasticResumeError(UserError, RuntimeError):
    """A checkpoint cannot be resumed on this world size; the message names it and the fix."""


def optimizer_partition_file(rank: int) -> str:
    """The file of rank ``rank``'s ZeRO 1/2 optimizer partition in a checkpoint folder."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


@dataclass(frozen=True)
class SavedLayout:
    """How a checkpoint was written, read from its model-states file."""

    folder: Path
    world_size: int
    """Data-parallel ranks that wrote it."""
    zero_stage: int
    batch_size_per_gpu: int
    """Images per rank and step (P x K) of the run that wrote it."""

    def classes_per_batch(self, samples_per_class: int) -> int:
        """P per rank of the run that wrote it, given its K (``sampler.samples_per_class``)."""
        return self.batch_size_per_gpu // samples_per_class


def saved_layout(folder: str | Path) -> SavedLayout:
    """Read ranks, ZeRO stage and per-rank batch of the checkpoint in ``folder``.

    Raises :class:`ElasticResumeError` when ``folder`` holds no DeepSpeed checkpoint, when it
    is a ZeRO-3 checkpoint, or when optimizer partitions are missing.
    """
    folder = Path(folder)
    file = folder / MODEL_STATES
    if not file.is_file():
        raise ElasticResumeError(
            f"{folder} holds no DeepSpeed checkpoint ({MODEL_STATES} is missing); point "
            "'latest' at a complete step_* folder, or start a new train.output_dir"
        )
    # mmap: only the small entries are read, not the module weights.
    states = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    ds_config = states.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    world = int(states["dp_world_size"])
    if stage not in (0, 1, 2):
        raise ElasticResumeError(
            f"{folder} is a ZeRO-{stage} checkpoint, which cannot resume on another number "
            f"of ranks here; resume it on {world} ranks, or export its weights with "
            "DeepSpeed's zero_to_fp32.py and start a new train.output_dir from them"
        )
    if stage:
        missing = [
            optimizer_partition_file(r)
            for r in range(world)
            if not (folder / optimizer_partition_file(r)).is_file()
        ]
        if missing:
            raise ElasticResumeError(
                f"{folder} was written by {world} ranks but lacks {', '.join(missing)}; copy "
                "the missing files from the run that wrote it, or point 'latest' at an "
                "earlier complete checkpoint"
            )
    return SavedLayout(folder, world, stage, int(ds_config["train_micro_batch_size_per_gpu"]))


def classes_per_batch_for(
    saved_world_size: int, saved_classes_per_batch: int, world_size: int
) -> int:
    """P per rank (``sampler.classes_per_batch``) on ``world_size`` ranks that keeps the
    checkpoint's global batch: (``saved_classes_per_batch`` x ``saved_world_size``) /
    ``world_size``. Raises :class:`ConfigError` when that does not divide."""
    global_classes = saved_classes_per_batch * saved_world_size
    if global_classes % world_size:
        fits = [n for n in range(1, global_classes + 1) if global_classes % n == 0]
        raise ConfigError(
            f"sampler.classes_per_batch: the checkpoint's global batch has {global_classes} "
            f"classes ({saved_world_size} ranks x {saved_classes_per_batch}), which "
            f"{world_size} ranks cannot share equally; resume on a number of ranks that "
            f"divides {global_classes} ({', '.join(map(str, fits))}), or start a new "
            "train.output_dir to change the global batch"
        )
    return global_classes // world_size


def stream_position(step: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, step in epoch) to resume the training stream at global optimizer step ``step``.

    ``sampler.steps_per_epoch`` counts optimizer steps, equal on every rank, and the global
    batch is kept (:func:`classes_per_batch_for`), so the position does not depend on the
    world size: after a resume on M ranks the run still has the same steps, epochs and
    images per step as on N. What differs is the order: ``train_loader`` draws a rank's
    batches from (``sampler.seed``, epoch, rank, world size, step) and splits the shards over
    the ranks, so the remaining steps of the interrupted epoch see other P x K groups than the
    uninterrupted run on N ranks would have (the epoch's samples are not re-partitioned to
    match what the N ranks had already consumed: some may be seen twice, some not at all in
    that epoch). Every later epoch is the stream of an M-rank run from its start.
    """
    return divmod(step, steps_per_epoch)


def load(engine: Any, root: str | Path, tag: str) -> dict:
    """Restore ``engine`` (weights, fp32 masters, optimizer state and step, LR schedule,
    DeepSpeed's step counters) from checkpoint ``root/tag`` written with any number of ranks,
    and return its client state. All ranks participate.

    Same world size, or ZeRO 0: DeepSpeed's own load. ZeRO 1/2 on another world size: the
    module, schedule and counters through DeepSpeed's load (without its optimizer files),
    then the optimizer partitions re-cut for this world size from the old ones.
    """
    layout = saved_layout(Path(root) / tag)
    stage = int(engine.zero_optimization_stage())
    if stage != layout.zero_stage:
        raise ElasticResumeError(
            f"{layout.folder} holds a ZeRO-{layout.zero_stage} checkpoint but this run uses "
            f"ZeRO-{stage}; set train.zero_stage={layout.zero_stage}"
        )
    world = get_world_size()
    if stage == 0 or layout.world_size == world:
        _, client = engine.load_checkpoint(str(root), tag=tag)
        return client
    # All ranks participate. Without optimizer states DeepSpeed skips its world-size check
    # and refreshes the fp32 masters from the module weights; both are overwritten below.
    _, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=False)
    _load_partitions(engine, layout)
    return client


def _load_file(path: Path) -> dict:
    # Imported here: checkpoint.py calls this module from its load path.

    states = safe_load(path, map_location="cpu")
    try:
        sd = states[_OPTIMIZER_STATE_DICT]
        for key in (_FP32_PARTITIONS, _BASE_OPTIMIZER_STATE, _SLICE_MAPPINGS, _GROUP_PADDINGS):
            sd[key]
    except KeyError as e:
        raise ElasticResumeError(
            f"{path} lacks the ZeRO entry {e.args[0]!r} (written by DeepSpeed "
            f"{states.get('ds_version', '?')}); resume it on the number of ranks that wrote it "
            "with that DeepSpeed version"
        ) from None
    return sd


@dataclass
class _Recut:
    """This rank's new ZeRO 1/2 partitions, filled one old rank's file at a time."""

    masters: list[torch.Tensor]  # this rank's flat fp32 partition of each group
    # Where each parameter of this rank's partition lives: its elements [lp, lp + numel)
    # sit at [hp, hp + numel) of the group's flat partition (DeepSpeed's own mapping).
    wanted: dict[str, tuple[int, int, int, int]]  # name -> (group, lp, hp, numel)
    numels: dict[str, int]  # name -> elements of the whole parameter
    new: list[dict[str, torch.Tensor]]  # per group: "fp32" and each per-element state key
    scalars: list[dict[str, Any]]  # per group: state that is not split (e.g. Adam's step)
    hyper: list[dict]  # per group: the saved hyperparameters (lr, betas, ...)
    seen: dict[str, int]  # elements of each parameter in earlier partitions

    @classmethod
    def for_engine(cls, engine: Any) -> _Recut:
        zero = engine.optimizer
        masters = zero.single_partition_of_fp32_groups
        names = {p: n for n, p in engine.module.named_parameters()}
        wanted: dict[str, tuple[int, int, int, int]] = {}
        numels: dict[str, int] = {}
        for group, params in enumerate(zero.bit16_groups):
            for p in params:
                numels[names[p]] = p.numel()
                m = p._hp_mapping
                if m is not None:
                    lp, hp = m.lp_fragment_address, m.hp_fragment_address
                    wanted[names[p]] = (group, lp.start, hp.start, lp.numel)
        return cls(
            masters=masters,
            wanted=wanted,
            numels=numels,
            new=[{"fp32": torch.zeros_like(t)} for t in masters],
            scalars=[{} for _ in masters],
            hyper=[],
            seen=defaultdict(int),
        )


def _load_partitions(engine: Any, layout: SavedLayout) -> None:
    """Re-cut the old ranks' ZeRO 1/2 partitions into this rank's partitions."""
    recut = _Recut.for_engine(engine)
    for rank in range(layout.world_size):
        # One old file in memory at a time: it is freed when _recut_file returns.
        _recut_file(recut, layout.folder / optimizer_partition_file(rank), rank)
    short = sorted(n for n, numel in recut.numels.items() if recut.seen[n] != numel)
    if short:
        raise ElasticResumeError(
            f"{layout.folder}: the optimizer partitions hold {recut.seen[short[0]]} of the "
            f"{recut.numels[short[0]]} elements of {short[0]!r}; resume from a complete "
            "checkpoint"
        )
    _install(engine.optimizer, recut)


def _recut_file(recut: _Recut, path: Path, rank: int) -> None:
    """Copy into ``recut`` the parts of the old rank ``rank``'s partitions (``path``) that fall
    in this rank's partitions."""
    sd = _load_file(path)
    state = sd[_BASE_OPTIMIZER_STATE]
    if len(sd[_SLICE_MAPPINGS]) != len(recut.masters):
        raise ElasticResumeError(
            f"{path} has {len(sd[_SLICE_MAPPINGS])} parameter groups, this model "
            f"{len(recut.masters)}; resume with the optimizer settings it was trained with"
        )
    if rank == 0:
        recut.hyper = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    for group, mapping in enumerate(sd[_SLICE_MAPPINGS]):
        fp32 = sd[_FP32_PARTITIONS][group]
        # The optimizer state covers the partition with its padding; the fp32 copy not.
        padded = fp32.numel() + sd[_GROUP_PADDINGS][group]
        sources = {"fp32": fp32}
        # One flat partition per group, so the torch state's parameter index is the group.
        for key, value in state["state"].get(group, {}).items():
            if torch.is_tensor(value) and value.shape == (padded,):
                sources[key] = value
                recut.new[group].setdefault(key, torch.zeros_like(recut.masters[group]))
            elif rank == 0:
                recut.scalars[group][key] = value  # e.g. Adam's step: one per group, not split
        for name, frag in mapping.items():
            _copy_fragment(recut, path, group, name, frag, sources)


def _copy_fragment(
    recut: _Recut, path: Path, group: int, name: str, frag: Any, sources: dict
) -> None:
    """Copy the part of the old fragment ``frag`` of parameter ``name`` (group ``group`` of
    ``path``) that falls in this rank's partition, for fp32 and every state key."""
    if name not in recut.numels:
        raise ElasticResumeError(
            f"{path} holds parameter {name!r}, which this model does not have; "
            "resume with the model settings it was trained with"
        )
    start = recut.seen[name]
    recut.seen[name] += frag.numel
    if name not in recut.wanted:
        return
    g, lp, hp, n = recut.wanted[name]
    lo, hi = max(start, lp), min(start + frag.numel, lp + n)
    if g != group:
        raise ElasticResumeError(
            f"{path}: parameter {name!r} is in group {group}, in this model in "
            f"group {g}; resume with the optimizer settings it was trained with"
        )
    if lo >= hi:
        return
    for key, src in sources.items():
        dst = recut.new[group][key]
        dst[hp + lo - lp : hp + hi - lp] = src[frag.start + lo - start : frag.start + hi - start]


def _install(zero: Any, recut: _Recut) -> None:
    """Put the re-cut partitions into the engine's ZeRO optimizer and its module weights."""
    masters, new, scalars = recut.masters, recut.new, recut.scalars
    base = zero.optimizer  # the torch optimizer over this rank's flat fp32 partitions
    with torch.no_grad():
        for group, flat in enumerate(masters):
            flat.copy_(new[group].pop("fp32"))
    # torch's own load puts each value where this optimizer wants it (e.g. fused Adam's step
    # on the GPU) and takes the saved hyperparameters (lr, initial_lr, betas, ...).
    base.load_state_dict(
        {
            "state": {
                g: {**new[g], **scalars[g]} for g in range(len(masters)) if new[g] or scalars[g]
            },
            "param_groups": [{**h, "params": [g]} for g, h in enumerate(recut.hyper)],
        }
    )
    if all(base.state.get(flat) for flat in masters):
        # DeepSpeed links each parameter's view of the optimizer state once, after the first
        # group's step; relink it to the new tensors (safe_get_full_optimizer_state reads it).
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    # All ranks participate (all-gather): the module weights from the restored masters.
    zero.update_lp_params()


def _clone(value: Any) -> Any:
    return value.clone() if torch.is_tensor(value) else value


def full_state(engine: Any) -> dict:
    """The engine's training state independent of its world size: per parameter name its
    fp32 master and optimizer state, each whole; the optimizer's per-group step and
    hyperparameters; the LR schedule; DeepSpeed's step counter. All ranks participate (ZeRO
    1/2: one all-reduce per parameter and state key); every rank gets the same dict.
    """
    params = dict(engine.module.named_parameters())
    masters: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, Any]] = {}
    if engine.zero_optimization():
        zero = engine.optimizer
        base = zero.optimizer
        by_param = {p: i for i, ps in enumerate(zero.bit16_groups) for p in ps}
        for name, p in params.items():
            if p not in by_param:
                continue  # frozen: not optimized, restored with the module
            group = by_param[p]
            flat = zero.single_partition_of_fp32_groups[group]
            state = base.state.get(flat, {})
            masters[name] = _gather(zero, group, p, flat)
            optim[name] = {}
            for key, value in sorted(state.items()):
                if torch.is_tensor(value) and value.shape == flat.shape:
                    optim[name][key] = _gather(zero, group, p, value)
                else:
                    optim[name][key] = _clone(value)
        groups = base.param_groups
    else:
        opt = engine.optimizer
        for name, p in params.items():
            if not p.requires_grad:
                continue
            masters[name] = p.detach().float().cpu().clone()
            optim[name] = {k: _clone(v) for k, v in sorted(opt.state.get(p, {}).items())}
        groups = opt.param_groups
    return {
        "masters": masters,
        "optimizer": optim,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None,
        "global_steps": engine.global_steps,
    }


def _gather(zero: Any, group: int, param: torch.Tensor, partition: torch.Tensor) -> torch.Tensor:
    """The whole of ``param``'s part of a flat per-rank ``partition`` (its fp32 master or a
    state tensor). All ranks of the group participate (all-reduce).

    DeepSpeed's ``safe_get_full_optimizer_state`` does the same but fails in 0.19.8 for all but
    the first parameter group ("exp_avg not found in optimizer state fragment"): it links the
    optimizer state after the first group's step, before the other groups have any.
    """
    buf = torch.zeros(param.numel(), dtype=partition.dtype, device=partition.device)
    m = param._hp_mapping
    if m is not None:
        lp, hp = m.lp_fragment_address, m.hp_fragment_address
        buf[lp.start : lp.start + lp.numel] = partition[hp.start : hp.start + hp.numel]
    # All ranks participate: every element comes from exactly one rank, the others add 0.
    collectives.all_reduce_sum_over(buf, zero.real_dp_process_group[group])
    return buf.view(param.shape).cpu()


def state_differences(before: dict, after: dict) -> list[str]:
    """What differs between two :func:`full_state` results: tensors must have the same dtype,
    shape and values (``torch.equal``: exact, no tolerance; -0.0 equals 0.0 because the
    all-reduce in :func:`full_state` turns -0.0 into 0.0 on more than one rank)."""
    out = []

    def same(a: Any, b: Any) -> bool:
        if torch.is_tensor(a) or torch.is_tensor(b):
            return (
                torch.is_tensor(a)
                and torch.is_tensor(b)
                and a.dtype == b.dtype
                and a.shape == b.shape
                and torch.equal(a, b)
            )
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
            return math.isnan(b)
        return type(a) is type(b) and a == b

    for name in sorted(set(before["masters"]) | set(after["masters"])):
        a, b = before["masters"].get(name), after["masters"].get(name)
        if a is None or b is None or not same(a, b):
            out.append(f"master {name}")
    for name in sorted(set(before["optimizer"]) | set(after["optimizer"])):
        a, b = before["optimizer"].get(name, {}), after["optimizer"].get(name, {})
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b or not same(a[key], b[key]):
                out.append(f"optimizer {name}.{key}")
    for key in ("param_groups", "lr_scheduler", "global_steps"):
        if before[key] != after[key]:
            out.append(f"{key}: {before[key]} != {after[key]}")
    return out
