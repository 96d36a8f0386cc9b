"""Every collective of the pipeline.

Each is called by all ranks in the same order, never under a rank-0 branch, and returns its
input (or runs alone) with one process.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from pipeline.distributed.group import device, get_rank, get_world_size, is_distributed

T = TypeVar("T")


def barrier() -> None:
    # All ranks participate.
    if is_distributed():
        dist.barrier()


def all_gather_nograd(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (equal shapes; no gradient).

    All ranks participate. For labels, indices and other non-differentiable data.
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        ctx.n = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every rank's embeddings, so the gradient of
        # a rank's slice is the sum over ranks of their gradients for that slice.
        # All ranks participate (the backward passes run in lockstep).
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, carrying gradients back to owners.

    All ranks participate; every rank must pass the same shape.
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; all ranks participate)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks (returns a new tensor; all ranks participate)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_reduce_sum_over(tensor: torch.Tensor, process_group: Any) -> torch.Tensor:
    """Sum ``tensor`` in place over ``process_group``, a subgroup such as DeepSpeed's
    data-parallel group; returns it. Every rank of that group participates."""
    dist.all_reduce(tensor, group=process_group)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (all ranks participate)."""
    if not is_distributed():
        return [obj]
    every: list[Any] = [None] * get_world_size()
    dist.all_gather_object(every, obj)
    return every


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (BatchNorm running statistics), in place.

    All ranks participate. DeepSpeed, unlike torch's DDP, does not broadcast buffers, so with
    trainable BatchNorm each rank would keep statistics of its own batches: the evaluation
    would embed each rank's share with another model, and the saved weights (rank 0's) would
    not be the evaluated ones. One flat broadcast per dtype keeps it to a few
    messages per step.
    """
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in module.buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf)
    for bufs in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        dist.broadcast(flat, src=src)
        offset = 0
        for b in bufs:
            n = b.numel()
            b.data.copy_(flat[offset : offset + n].view_as(b))
            offset += n


def all_gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows in rank order; the row counts may differ, even be 0.

    All ranks participate. Every rank passes the same dtype and the same shape after the
    first axis (a rank with no rows still passes ``(0, *row_shape)``).
    """
    if get_world_size() == 1:
        return local
    dev = device()  # NCCL only moves CUDA tensors
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    counts = all_gather_nograd(n).tolist()
    # all_gather needs equal shapes, hence the padding to the largest count.
    step = max(counts)
    padded = np.zeros((step, *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local
    gathered = all_gather_nograd(torch.from_numpy(padded).to(dev)).cpu().numpy()
    return np.concatenate([gathered[r * step : r * step + c] for r, c in enumerate(counts)])


def all_gather_topk(
    scores_Bk: np.ndarray, ids_Bk: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every rank's top-k lists (scores, ids) for the same query block, in rank order.

    All ranks participate, each with the same (B, k) shapes (its own gallery slice's top-k).
    """
    if get_world_size() == 1:
        return [scores_Bk], [ids_Bk]
    dev = device()  # NCCL only moves CUDA tensors
    # A leading axis of 1 makes the gathered tensor (world, B, k): one slab per rank.
    s = all_gather_nograd(torch.from_numpy(np.ascontiguousarray(scores_Bk))[None].to(dev))
    i = all_gather_nograd(torch.from_numpy(np.ascontiguousarray(ids_Bk))[None].to(dev))
    s, i = s.cpu().numpy(), i.cpu().numpy()
    return list(s), list(i)


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn()`` on rank 0 only and give its result, or its exception, to every rank.

    All ranks participate (one broadcast), so a failure on rank 0 cannot leave the others
    waiting in a later collective. Every rank raises rank 0's exception itself (same class
    and message, so a user error is one line everywhere); an exception that cannot be sent
    becomes a RuntimeError naming it. The result must be picklable.
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # re-raised on every rank below
            error = e
            try:
                pickle.loads(pickle.dumps(e))
                box[0] = ("error", e)
            except Exception:
                box[0] = ("error", RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}"))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        if error is not None:
            raise error
        raise value
    return value


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (all ranks participate)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def rank_hosts() -> dict[str, list[int]]:
    """Host name -> the ranks on it, the same on every rank (all ranks participate)."""
    host = socket.gethostname()
    if not is_distributed():
        return {host: [0]}
    names: list[Any] = [None] * get_world_size()
    dist.all_gather_object(names, host)
    table: dict[str, list[int]] = {}
    for rank, name in enumerate(names):
        table.setdefault(name, []).append(rank)
    return table
