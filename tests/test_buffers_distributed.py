"""BatchNorm statistics are one model's on every rank: collectives.broadcast_buffers with 2
real gloo processes."""

from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.distributed


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 36, 2),
    )


def _worker(rank: int, world: int, out: str) -> None:
    from pipeline.distributed import collectives

    net = _net().train()
    # Each rank sees other data, so its running statistics drift apart from the others'.
    torch.manual_seed(100 + rank)
    net(torch.randn(5, 3, 8, 8) * (rank + 1))
    bn = net[1]
    mine = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    gathered = collectives.all_gather_nograd(bn.running_mean.unsqueeze(0))
    assert not torch.equal(gathered[0], gathered[1])
    collectives.broadcast_buffers(net, src=0)
    gathered = {
        name: collectives.all_gather_nograd(buf.unsqueeze(0)) for name, buf in net.named_buffers()
    }
    for name, g in gathered.items():
        assert torch.equal(g[0], g[1]), name
    if rank == 0:  # the source keeps its own values, bit for bit
        assert torch.equal(bn.running_mean, mine[0]) and torch.equal(bn.running_var, mine[1])
        assert bn.num_batches_tracked.item() == mine[2].item() == 1
        torch.save({k: v for k, v in net.state_dict().items()}, out)


def test_broadcast_buffers_gives_every_rank_rank0s_statistics(tmp_path):
    run_distributed(_worker, 2, str(tmp_path / "state.pt"))
    assert (tmp_path / "state.pt").is_file()


def test_broadcast_buffers_is_a_no_op_in_one_process():
    from pipeline.distributed import collectives

    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    collectives.broadcast_buffers(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
