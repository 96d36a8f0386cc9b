"""One optimizer step's forward and backward, optionally through a gradient cache.

Smooth-AP ranks every query against the whole (global) batch, so the batch cannot be split
into micro-batches with separate losses (gradient accumulation changes the objective). The
gradient cache (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", 2021) keeps the objective and bounds activation memory by the chunk size:

1. forward the local batch chunk by chunk without autograd and keep only the embeddings;
2. compute the loss on all embeddings (gathered across ranks inside the loss) and its
   gradient with respect to the local embeddings, ``g = d loss / d emb``;
3. forward each chunk again with autograd and back-propagate ``g``'s slice into the
   parameters (the surrogate ``sum(emb_chunk * g_chunk)`` has exactly that gradient).

The parameter gradients equal those of one full forward/backward when the network computes
the same embeddings in both passes: no batch statistics (frozen BatchNorm; the BatchNorm
policy, pipeline.train.batchnorm, refuses 1-image chunks and warns about trainable BatchNorm)
and the same random numbers (each chunk's RNG state is replayed in its second forward, so
dropout and drop-path masks match).

Shape legend: B local images, c images of one chunk, D embedding dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def forward_backward(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images_BCHW: torch.Tensor,
    labels_B: torch.Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int = 0,
    backward: Callable[[torch.Tensor], object] | None = None,
    set_boundary: Callable[[bool], object] | None = None,
) -> torch.Tensor:
    """Forward, loss and backward of one local batch; returns the (detached) local loss.

    ``chunk_size`` > 0 and smaller than the batch turns the gradient cache on. ``backward``
    back-propagates a scalar (DeepSpeed's ``engine.backward``; default ``Tensor.backward``).
    ``set_boundary(is_last)`` is called before each chunk's backward so that DeepSpeed
    reduces gradients across ranks once, after the last chunk (``engine.
    set_gradient_accumulation_boundary``). All ranks participate (the loss gathers).
    """
    backward = backward or torch.Tensor.backward
    batch = images_BCHW.shape[0]
    if chunk_size <= 0 or chunk_size >= batch:
        if set_boundary is not None:
            set_boundary(True)
        loss = loss_fn(model(images_BCHW), labels_B)
        backward(loss)
        return loss.detach()

    device = images_BCHW.device
    chunks = images_BCHW.split(chunk_size)
    states, embs = [], []
    with torch.no_grad():
        for x_cCHW in chunks:
            states.append(_rng_state(device))
            embs.append(model(x_cCHW))
    after = _rng_state(device)
    # The loss in float32 (float64 stays) on the cached embeddings; only they need a gradient.
    emb_BD = torch.cat(embs)
    if emb_BD.dtype != torch.float64:
        emb_BD = emb_BD.float()
    emb_BD.requires_grad_(True)
    # All ranks participate: the loss all-gathers the embeddings, and its backward sums
    # every rank's gradient for this rank's embeddings (pipeline.distributed.collectives).
    loss = loss_fn(emb_BD, labels_B)
    (grad_BD,) = torch.autograd.grad(loss, emb_BD)
    for i, (x_cCHW, g_cD, state) in enumerate(zip(chunks, grad_BD.split(chunk_size), states)):
        if set_boundary is not None:
            set_boundary(i == len(chunks) - 1)
        _set_rng_state(state, device)
        emb_cD = model(x_cCHW)
        # d/d(theta) of sum(emb * g) = J^T g: this chunk's share of d loss / d theta.
        backward((emb_cD.to(g_cD.dtype) * g_cD).sum())
    _set_rng_state(after, device)
    return loss.detach()
