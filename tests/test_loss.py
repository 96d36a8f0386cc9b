"""Smooth-AP against independent references: a loop-by-loop float64 transcription of
the paper's equation, and a dense B x B x B transcription of the released code."""

import math

import pytest
import torch

from pipeline.loss import SmoothAPLoss


def sigmoid_ref(x: float, tau: float) -> float:
    return 1.0 / (1.0 + math.exp(-x / tau)) if x / tau > -700 else 0.0


def loss_reference(emb, labels, tau, query_in_positives):
    """The equation, one query and one positive at a time, in Python floats."""
    e = emb.double().tolist()
    y = [int(v) for v in labels.tolist()]
    n = len(y)

    def s(a, b):
        return sum(x * z for x, z in zip(e[a], e[b], strict=True))

    aps = []
    for q in range(n):
        others = [j for j in range(n) if j != q]
        ret = list(range(n)) if query_in_positives else others
        pos = [j for j in ret if y[j] == y[q]]
        if not pos:
            continue
        total = 0.0
        for p in pos:
            num = 1.0 + sum(sigmoid_ref(s(q, j) - s(q, p), tau) for j in pos if j != p)
            den = 1.0 + sum(sigmoid_ref(s(q, j) - s(q, p), tau) for j in ret if j != p)
            total += num / den
        aps.append(total / len(pos))
    return 1.0 - sum(aps) / len(aps) if aps else 0.0


def released_code_formula(emb, num_classes, tau):
    """Dense formulation of the released code on a block layout (B x B x B tensors).

    Written from the math: rank of each item i among all items for query q, with
    the diagonal j == i masked, and the same within the query's class block.
    """
    B = emb.shape[0]
    g = B // num_classes

    def G(x):
        return 1.0 / (1.0 + torch.exp(torch.clamp(-x / tau, -50, 50)))

    sim = emb @ emb.T  # B x B
    diff = sim[:, None, :] - sim[:, :, None]  # [q, i, j] = s_qj - s_qi
    mask = 1.0 - torch.eye(B, dtype=emb.dtype)
    rank_all = (G(diff) * mask).sum(-1) + 1.0  # [q, i]
    blocks = emb.view(num_classes, g, -1)
    sim_pos = blocks @ blocks.transpose(1, 2)  # [c, q, i]
    diff_pos = sim_pos[:, :, None, :] - sim_pos[:, :, :, None]  # [c, q, i, j]
    mask_pos = 1.0 - torch.eye(g, dtype=emb.dtype)
    rank_pos = (G(diff_pos) * mask_pos).sum(-1) + 1.0  # [c, q, i]
    ap = torch.zeros((), dtype=emb.dtype)
    for c in range(num_classes):
        block = slice(c * g, (c + 1) * g)
        ap = ap + (rank_pos[c] / rank_all[block, block]).sum() / g / B
    return 1.0 - ap


def random_batch(n, d, num_classes, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=1)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return emb, labels


@pytest.mark.parametrize("query_in_positives", [False, True])
@pytest.mark.parametrize("tau", [0.01, 0.05, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(query_in_positives, tau, seed):
    # Shuffled labels with unequal counts and (usually) singletons.
    emb, labels = random_batch(23, 8, 7, seed)
    got = SmoothAPLoss(tau, query_in_positives)(emb, labels)
    want = loss_reference(emb, labels, tau, query_in_positives)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_singletons_are_left_out_of_the_mean():
    emb, _ = random_batch(6, 4, 1, 3)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])  # 1 and 3 have no positive
    got = SmoothAPLoss(0.1)(emb, labels)
    want = loss_reference(emb, labels, 0.1, False)
    keep = torch.tensor([0, 1, 3, 4])
    # Removing the singletons from the queries does not change the value only
    # because the reference leaves them out of the mean; they stay in the ranking.
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert got.item() != pytest.approx(
        loss_reference(emb[keep], labels[keep], 0.1, False), rel=1e-6
    )


def test_no_positive_anywhere_gives_zero_and_zero_grad():
    emb, _ = random_batch(5, 4, 1, 4)
    emb.requires_grad_(True)
    loss = SmoothAPLoss()(emb, torch.arange(5))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(emb.grad) == 0


@pytest.mark.parametrize("num_classes,per_class", [(3, 4), (5, 2), (4, 5)])
def test_released_mode_equals_released_formula(num_classes, per_class):
    emb, _ = random_batch(num_classes * per_class, 16, 1, num_classes)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    for tau in (0.01, 0.1):
        got = SmoothAPLoss(tau, query_in_positives=True)(emb, labels)
        want = released_code_formula(emb, num_classes, tau)
        assert got.item() == pytest.approx(want.item(), rel=1e-13, abs=1e-15)


def test_default_mode_differs_from_released_mode():
    emb, _ = random_batch(12, 8, 1, 9)
    labels = torch.arange(3).repeat_interleave(4)
    paper = SmoothAPLoss(0.05)(emb, labels)
    released = SmoothAPLoss(0.05, query_in_positives=True)(emb, labels)
    assert abs(paper.item() - released.item()) > 1e-4


@pytest.mark.parametrize("query_in_positives", [False, True])
def test_gradcheck_float64(query_in_positives):
    emb, labels = random_batch(10, 5, 3, 11)
    emb.requires_grad_(True)
    loss_fn = SmoothAPLoss(0.2, query_in_positives)
    assert torch.autograd.gradcheck(lambda e: loss_fn(e, labels), (emb,), eps=1e-6, atol=1e-8)


def test_chunking_changes_nothing():
    emb, labels = random_batch(40, 8, 6, 5)
    emb.requires_grad_(True)
    values, grads = [], []
    for chunk in (0, 1, 7, 40):
        emb.grad = None
        loss = SmoothAPLoss(0.05, query_chunk_size=chunk)(emb, labels)
        loss.backward()
        values.append(loss.item())
        grads.append(emb.grad.clone())
    for v, g in zip(values[1:], grads[1:], strict=True):
        assert v == pytest.approx(values[0], rel=1e-13)
        torch.testing.assert_close(g, grads[0], rtol=1e-12, atol=1e-14)


def test_separated_classes_near_zero_and_reversed_near_one():
    # Two classes on two opposite directions: every positive outranks every negative.
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    base = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    jitter = torch.tensor([[0, 0.05], [0, -0.05], [0, 0.0]] * 2, dtype=torch.float64)
    emb = torch.nn.functional.normalize(base[labels] + jitter, dim=1)
    assert SmoothAPLoss(0.01)(emb, labels).item() < 1e-6
    # Reversed ranking: each query's positives all rank below all its negatives.
    # With many negatives per query, AP -> 0 and the loss -> 1.
    n_neg = 200
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    pos = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)
    neg = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        + 0.01
        * torch.randn(n_neg, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        dim=1,
    )
    emb = torch.cat([q, pos, neg])
    labels = torch.tensor([0, 0, *range(1, n_neg + 1)])
    assert SmoothAPLoss(0.01)(emb, labels).item() > 0.99


def test_float32_under_bf16_autocast():
    emb, labels = random_batch(16, 8, 4, 6, dtype=torch.float32)
    want = SmoothAPLoss(0.01)(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = SmoothAPLoss(0.01)(emb.bfloat16(), labels)
    assert got.dtype == torch.float32
    # Only the bf16 rounding of the inputs differs.
    want_bf16_inputs = SmoothAPLoss(0.01)(emb.bfloat16().float(), labels)
    assert got.item() == pytest.approx(want_bf16_inputs.item(), rel=1e-6)
    assert got.item() == pytest.approx(want.item(), abs=0.05)


def test_float32_matches_float64():
    emb, labels = random_batch(64, 16, 8, 7)
    want = SmoothAPLoss(0.01)(emb, labels)
    got = SmoothAPLoss(0.01)(emb.float(), labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


def test_errors():
    loss_fn = SmoothAPLoss()
    with pytest.raises(ValueError, match=r"embeddings must be \(n, D\)"):
        loss_fn(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \(n,\) with n = 4"):
        loss_fn(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        loss_fn(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="temperature"):
        SmoothAPLoss(temperature=0)
