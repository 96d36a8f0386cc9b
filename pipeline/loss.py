"""Smooth-AP (Brown, Xie, Kalogeiton, Zisserman, ECCV 2020), exact and memory-linear.

For a query q with positives P and retrieval set O, and G(x) = sigmoid(x / tau):

    AP_q = 1/|P| sum_{p in P} (1 + sum_{j in P, j != p} G(s_qj - s_qp))
                             / (1 + sum_{j in O, j != p} G(s_qj - s_qp))
    loss = 1 - mean of AP_q over the queries that have a positive.

Only (query, positive) pairs need a smoothed rank, so the cost is O(n x K x N)
for n queries with at most K positives each against N items -- not the O(N^3)
tensor of the released code. The gradient of AP_q with respect to the query's
similarity row is computed in the same pass as the value (each row of the
similarity matrix feeds exactly one AP_q), so backward is one multiply and the
sigmoid tensor is never stored.

Shape legend: n local queries, N items ranked against (all ranks), K padded
positives per query, D embedding dimension, c queries of one chunk.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from pipeline.distributed import collectives, group

# Keep each chunk's (c, K, N) temporaries near 2^24 floats (64 MB) when the user
# sets no chunk size: large enough that chunking costs nothing measurable.
_AUTO_CHUNK_ELEMENTS = 1 << 24


def _positive_layout(
    labels_n: torch.Tensor,
    labels_N: torch.Tensor,
    query_ids_n: torch.Tensor,
    query_in_positives: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's positive columns, padded to K: ``pos_idx_nK`` (long) and ``valid_nK``."""
    n = labels_n.shape[0]
    pos_nN = labels_n[:, None] == labels_N[None, :]
    if not query_in_positives:
        # The paper's equation: the query is not one of its own positives.
        pos_nN[torch.arange(n, device=pos_nN.device), query_ids_n] = False
    rows, cols = pos_nN.nonzero(as_tuple=True)  # row-major: each row's columns in order
    count_n = torch.bincount(rows, minlength=n)
    K = max(int(count_n.max().item()) if n else 0, 1)
    first_n = torch.cumsum(count_n, 0) - count_n
    slot = torch.arange(rows.shape[0], device=rows.device) - first_n[rows]
    pos_idx_nK = torch.zeros(n, K, dtype=torch.long, device=labels_N.device)
    pos_idx_nK[rows, slot] = cols
    valid_nK = torch.arange(K, device=labels_N.device)[None, :] < count_n[:, None]
    return pos_idx_nK, valid_nK


def _ap_chunk(
    sim_cN: torch.Tensor,
    pos_idx_cK: torch.Tensor,
    valid_cK: torch.Tensor,
    self_c: torch.Tensor | None,
    temperature: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AP of c queries and, if asked, d AP_q / d sim_qj for each row (c, N).

    ``self_c`` holds each query's own column, removed from its retrieval set (the
    paper's semantics), or None (the released code's: the query ranks itself).
    Six passes over one (c, K, N) buffer; every other tensor is (c, K) or (c, N).
    """
    c, K = pos_idx_cK.shape
    z_cN = sim_cN / temperature
    z_pos_cK = z_cN.gather(1, pos_idx_cK)
    # G[q, k, j] = sigmoid((s_qj - s_q,p_k) / tau); exactly 1/2 at j = p_k.
    G_cKN = torch.sub(z_cN[:, None, :], z_pos_cK[:, :, None]).sigmoid_()
    valid_f_cK = valid_cK.to(sim_cN.dtype)
    pos_idx_cKK = pos_idx_cK[:, None, :].expand(c, K, K)
    G_pos_cKK = G_cKN.gather(2, pos_idx_cKK) * valid_f_cK[:, None, :]  # G[q, k, p_m]
    # 1 + sum over j != p_k: the j = p_k term (1/2) is in the sums, so add 1 - 1/2.
    rank_pos_cK = G_pos_cKK.sum(2) + 0.5
    rank_all_cK = G_cKN.sum(2) + 0.5
    if self_c is not None:
        G_self_cK = G_cKN.gather(2, self_c[:, None, None].expand(c, K, 1)).squeeze(2)
        rank_all_cK = rank_all_cK - G_self_cK
    n_pos_c = valid_f_cK.sum(dim=1).clamp(min=1)
    ap_c = (rank_pos_cK / rank_all_cK * valid_f_cK).sum(dim=1) / n_pos_c
    if not need_grad:
        return ap_c, None

    # d ap / d rank_pos and d ap / d rank_all, for upstream gradient 1.
    d_ratio_cK = valid_f_cK / n_pos_c[:, None]
    b_cK = d_ratio_cK / rank_all_cK
    a_cK = -d_ratio_cK * rank_pos_cK / rank_all_cK.square()
    # d G / d x = G (1 - G) / tau, with x[q,k,j] = s_qj - s_q,p_k; in place.
    W_cKN = G_cKN.addcmul_(G_cKN, G_cKN, value=-1.0)
    # dL/dx[q,k,j] = (a_k [j in O] + b_k [j in P]) W[q,k,j] / tau. O is every column
    # (less the query's own), so the dense part is a_k W and the rest is sparse.
    # Column j receives sum_k dL/dx[q,k,j]; column p_k loses sum_j dL/dx[q,k,j].
    d_sim_cN = torch.bmm(a_cK[:, None, :], W_cKN).squeeze(1)
    W_pos_cKK = W_cKN.gather(2, pos_idx_cKK) * valid_f_cK[:, None, :]
    d_sim_cN.scatter_add_(1, pos_idx_cK, torch.bmm(b_cK[:, None, :], W_pos_cKK).squeeze(1))
    row_sum_cK = a_cK * W_cKN.sum(2) + b_cK * W_pos_cKK.sum(2)
    if self_c is not None:
        a_W_self_cK = a_cK * W_cKN.gather(2, self_c[:, None, None].expand(c, K, 1)).squeeze(2)
        d_sim_cN.scatter_add_(1, self_c[:, None], -a_W_self_cK.sum(1, keepdim=True))
        row_sum_cK = row_sum_cK - a_W_self_cK
    d_sim_cN.scatter_add_(1, pos_idx_cK, -row_sum_cK)
    return ap_c, d_sim_cN.div_(temperature)


class _SmoothAPRows(torch.autograd.Function):
    """Per-query Smooth-AP of a (n, N) similarity block; gradient from the forward pass."""

    @staticmethod
    def forward(ctx, sim_nN, pos_idx_nK, valid_nK, self_n, temperature, chunk):
        need_grad = ctx.needs_input_grad[0]
        aps, grads = [], []
        for start in range(0, sim_nN.shape[0], chunk):
            sl = slice(start, start + chunk)
            ap_c, d_c = _ap_chunk(
                sim_nN[sl],
                pos_idx_nK[sl],
                valid_nK[sl],
                None if self_n is None else self_n[sl],
                temperature,
                need_grad,
            )
            aps.append(ap_c)
            grads.append(d_c)
        if need_grad:
            ctx.save_for_backward(torch.cat(grads, dim=0))
        return torch.cat(aps, dim=0)

    @staticmethod
    def backward(ctx, grad_ap_n):
        (d_ap_d_sim_nN,) = ctx.saved_tensors
        return grad_ap_n[:, None] * d_ap_d_sim_nN, None, None, None, None, None


def smooth_ap_per_query(
    query_nD: torch.Tensor,
    items_ND: torch.Tensor,
    labels_n: torch.Tensor,
    labels_N: torch.Tensor,
    query_ids_n: torch.Tensor,
    temperature: float = 0.01,
    query_in_positives: bool = False,
    query_chunk_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth-AP of each query against ``items_ND`` (pure math, no communication).

    ``query_ids_n`` gives each query's own index among the N items (it is removed
    from its retrieval set unless ``query_in_positives``). Returns ``ap_n`` and the
    bool mask ``valid_n`` of queries that have at least one positive; ``ap_n`` is
    0 where not valid.
    """
    sim_nN = query_nD @ items_ND.T
    pos_idx_nK, valid_nK = _positive_layout(labels_n, labels_N, query_ids_n, query_in_positives)
    K, N = pos_idx_nK.shape[1], items_ND.shape[0]
    chunk = query_chunk_size or max(1, _AUTO_CHUNK_ELEMENTS // (K * max(N, 1)))
    self_n = None if query_in_positives else query_ids_n
    ap_n = _SmoothAPRows.apply(sim_nN, pos_idx_nK, valid_nK, self_n, float(temperature), chunk)
    return ap_n, valid_nK[:, 0]


def _check_inputs(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    if embeddings.dim() != 2:
        raise ValueError(
            f"embeddings must be (n, D), got shape {tuple(embeddings.shape)}; "
            "flatten the model output to one row per image"
        )
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be (n,) with n = {embeddings.shape[0]} (one per embedding), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(
            f"labels must be an integer tensor (class ids), got dtype {labels.dtype}; "
            "convert with labels.long()"
        )


class SmoothAPLoss(nn.Module):
    """1 - mean Smooth-AP over queries with a positive, across all ranks.

    Called as ``loss_fn(embeddings_nD, labels_n)``. Inner product is the
    similarity (the model head L2-normalises). With ``torch.distributed``
    initialised and more than one rank, embeddings (with gradients) and labels are
    gathered from all ranks and each rank ranks its own n queries against all
    N = world x n items. The value returned on each rank is scaled so that the
    ranks' average equals the single-process loss on the concatenated batch, and
    data-parallel averaged gradients equal the single-process gradients.

    Args:
        temperature: tau of the sigmoid (the paper uses 0.01).
        query_in_positives: False (default) is the paper's equation, the query
            outside its own retrieval set; True is the released code's semantics,
            the query in the retrieval set and its own positive.
        query_chunk_size: queries ranked at once (0: chosen to keep temporaries
            near 64 MB). Smaller bounds peak memory further; the result is the same.
    """

    def __init__(
        self,
        temperature: float = 0.01,
        query_in_positives: bool = False,
        query_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature={temperature!r}: must be > 0 (the paper uses 0.01)")
        if query_chunk_size < 0:
            raise ValueError(f"query_chunk_size={query_chunk_size!r}: must be >= 0 (0 = auto)")
        self.temperature = float(temperature)
        self.query_in_positives = bool(query_in_positives)
        self.query_chunk_size = int(query_chunk_size)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, query_in_positives={self.query_in_positives}, "
            f"query_chunk_size={self.query_chunk_size}"
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_inputs(embeddings, labels)
        # float32 (or float64 if given) whatever the autocast dtype: sigmoid
        # differences at tau = 0.01 need the mantissa that bf16 lacks.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb_nD = embeddings if embeddings.dtype == torch.float64 else embeddings.float()
            return self._loss(emb_nD, labels.long())

    def _loss(self, emb_nD: torch.Tensor, labels_n: torch.Tensor) -> torch.Tensor:
        n = emb_nD.shape[0]
        world = group.get_world_size()
        rank = group.get_rank()
        if world > 1:
            # All ranks participate: the local batch sizes must agree, or the
            # gathers below would hang or misalign.
            sizes = collectives.all_gather_nograd(torch.tensor([n], device=emb_nD.device))
            if (sizes != n).any():
                raise ValueError(
                    f"local batch sizes differ across ranks ({sizes.tolist()}); Smooth-AP "
                    "gathers equal-sized batches: give every rank the same batch size"
                )
        # All ranks participate. Embeddings carry gradients back to their owners:
        # every rank's queries are ranked against every rank's items.
        items_ND = collectives.all_gather_with_grad(emb_nD)
        # All ranks participate. Labels need no gradient.
        labels_N = collectives.all_gather_nograd(labels_n)
        query_ids_n = torch.arange(rank * n, (rank + 1) * n, device=emb_nD.device)
        # This rank's queries are taken from the gathered tensor so that each
        # embedding reaches the loss through one path only.
        query_nD = items_ND[rank * n : (rank + 1) * n]
        ap_n, valid_n = smooth_ap_per_query(
            query_nD,
            items_ND,
            labels_n,
            labels_N,
            query_ids_n,
            self.temperature,
            self.query_in_positives,
            self.query_chunk_size,
        )
        # The number of valid queries over all ranks, from the gathered labels
        # (no extra collective): a label seen at least twice (or once, when the
        # query is its own positive) makes every one of its items a valid query.
        if self.query_in_positives:
            num_valid = labels_N.shape[0]
        else:
            counts = torch.unique(labels_N, return_counts=True)[1]
            num_valid = int(counts[counts > 1].sum().item())
        if num_valid == 0:
            # No query has a positive: the loss is 0 with zero gradient, still
            # connected to the graph so that backward runs on every rank.
            return emb_nD.sum() * 0.0
        # mean over ranks of (1 - world * S_r / V) = 1 - sum_r S_r / V.
        return 1.0 - ap_n[valid_n].sum() * (world / num_valid)


@runtime_checkable
class LossState(Protocol):
    """A loss that keeps state across steps (a cross-batch memory, a running estimate).

    The trainer calls :meth:`after_step` after every optimizer step, and the checkpoint saves
    :meth:`state_dict` and gives it back through :meth:`load_state_dict` on a resume, so that
    a resumed run continues with the state an uninterrupted one would have. A loss without
    state (Smooth-AP) does not implement this protocol and nothing is saved for it.

    ``global_state`` decides what a resume on another number of ranks does: True when the
    state is identical on every rank (built from gathered values): it is saved once, by rank
    0, and loaded by every rank of any world size; False when each rank keeps its own: each
    rank saves its part, and a resume on another world size is refused with a one-line error.
    The state dict holds tensors and plain Python values only (loaded with
    ``weights_only=True``).
    """

    global_state: bool

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...

    def after_step(self, step: int) -> None:
        """The optimizer step ``step`` (counted from 1) is done. All ranks call it."""


def loss_state(loss: object) -> LossState | None:
    """``loss`` as a :class:`LossState` when it keeps state, else None."""
    return loss if isinstance(loss, LossState) else None
