"""2 real gloo processes: values and data-parallel averaged gradients equal the
1-process result on the concatenated batch."""

import pytest
import torch

from pipeline.distributed import collectives
from pipeline.loss import SmoothAPLoss
from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.distributed

N_PER_RANK, D_IN, D_OUT = 6, 5, 4
# Class 1 is on both ranks; rank 1 holds three singletons, so the ranks have
# different numbers of valid queries (6 vs 3 in the paper's semantics).
LABELS = torch.tensor([0, 0, 1, 2, 2, 3, 1, 1, 3, 6, 7, 8])


def make_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * N_PER_RANK, D_IN, generator=gen, dtype=torch.float64)
    weight = torch.randn(D_IN, D_OUT, generator=gen, dtype=torch.float64)
    return x, weight


def forward(x, weight, labels, **loss_kw):
    weight = weight.clone().requires_grad_(True)
    emb = torch.nn.functional.normalize(x @ weight, dim=1)
    emb.retain_grad()
    loss = SmoothAPLoss(**loss_kw)(emb, labels)
    loss.backward()
    return loss.detach(), weight.grad, emb.grad


def _worker(rank, world_size, out_path, loss_kw):
    x, weight = make_problem()
    sl = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    loss, w_grad, emb_grad = forward(x[sl], weight, LABELS[sl], **loss_kw)
    # Data-parallel training averages parameter gradients over ranks.
    w_grad_avg = collectives.all_reduce_sum(w_grad) / world_size
    loss_avg = collectives.all_reduce_sum(loss) / world_size
    torch.save(
        {"loss": loss, "loss_avg": loss_avg, "w_grad_avg": w_grad_avg, "emb_grad": emb_grad},
        f"{out_path}.{rank}",
    )


@pytest.mark.parametrize(
    "loss_kw",
    [
        {"temperature": 0.05},
        {"temperature": 0.01, "query_in_positives": True},
        {"temperature": 0.1, "query_chunk_size": 2},
    ],
)
def test_two_ranks_equal_one_rank(tmp_path, loss_kw):
    x, weight = make_problem()
    want_loss, want_w_grad, want_emb_grad = forward(x, weight, LABELS, **loss_kw)

    run_distributed(_worker, 2, str(tmp_path / "out"), loss_kw)
    got = [torch.load(f"{tmp_path / 'out'}.{r}") for r in range(2)]

    # The ranks' values differ (different valid queries) but average to the 1-process loss.
    assert got[0]["loss"].item() != pytest.approx(got[1]["loss"].item(), rel=1e-3)
    for g in got:
        torch.testing.assert_close(g["loss_avg"], want_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g["w_grad_avg"], want_w_grad, rtol=1e-10, atol=1e-13)
    # Each rank's embedding gradient, scaled by the DP average, is its slice of the
    # 1-process embedding gradient.
    for r, g in enumerate(got):
        sl = slice(r * N_PER_RANK, (r + 1) * N_PER_RANK)
        torch.testing.assert_close(g["emb_grad"] / 2, want_emb_grad[sl], rtol=1e-10, atol=1e-13)


def _unequal_worker(rank, world_size, out_path):
    emb = torch.randn(4 + rank, 3)
    labels = torch.zeros(4 + rank, dtype=torch.long)
    try:
        SmoothAPLoss()(emb, labels)
    except ValueError as e:
        with open(f"{out_path}.{rank}", "w") as f:
            f.write(str(e))


def test_unequal_local_batch_sizes_is_an_error(tmp_path):
    run_distributed(_unequal_worker, 2, str(tmp_path / "err"))
    for r in range(2):
        text = (tmp_path / f"err.{r}").read_text()
        assert "local batch sizes differ across ranks ([4, 5])" in text
