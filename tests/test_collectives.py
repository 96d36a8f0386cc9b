"""The pipeline's collectives and the process group's lifecycle (pipeline.distributed: collectives, group).

2 real gloo processes must give what 1 process gives on the whole data."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline.distributed import collectives, group
from pipeline.eval.knn import ExactIPIndex, iter_sharded_knn, knn_search, merge_topk
from tests.dist_helpers import run_distributed

# Rows per rank: rank 1 holds none (an eval split smaller than the job, or a short last shard).
ROWS_PER_RANK = (5, 0)
WIDTH = 3


def _rows(rank: int) -> tuple[np.ndarray, np.ndarray]:
    n = ROWS_PER_RANK[rank]
    rng = np.random.default_rng(rank)
    return rng.standard_normal((n, WIDTH)).astype(np.float32), np.arange(
        n, dtype=np.int64
    ) + 100 * rank


def _problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((23, 6)).astype(np.float32)
    # No exact ties: which tied item FAISS keeps at the k-th place is unspecified.
    return rng.standard_normal((9, 6)).astype(np.float32), gallery


def _gather_job(rank: int, world_size: int, out: str) -> None:
    emb, idx = _rows(rank)
    queries, gallery = _problem()
    k = 8
    # Each rank searches its own half of the gallery; the merged lists cover the whole of it.
    lo, hi = (0, 12) if rank == 0 else (12, 23)
    s_loc, i_loc = ExactIPIndex(gallery[lo:hi], lo).search(queries, k)
    s_all, i_all = collectives.all_gather_topk(s_loc, i_loc)  # all ranks participate
    result = {
        "emb": collectives.all_gather_rows(emb),
        "idx": collectives.all_gather_rows(idx),
        "topk_parts": (s_all, i_all),
        "knn": knn_search(queries, gallery, k, query_block=4),
        "on_main": collectives.on_main(lambda: {"rank": group.get_rank()}),
        "max": collectives.all_reduce_max(torch.tensor([float(rank), 5.0 - rank, -1.0])),
        "objects": collectives.all_gather_objects({"rank": rank, "skipped": ["x"] * rank}),
        "sum_over": collectives.all_reduce_sum_over(torch.tensor([rank + 1.0]), dist.group.WORLD),
    }
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump(result, f)


@pytest.mark.distributed
def test_two_ranks_gather_what_one_rank_holds(tmp_path):
    run_distributed(_gather_job, 2, str(tmp_path / "out"))
    got = [pickle.loads((tmp_path / f"out.{r}").read_bytes()) for r in range(2)]

    # One process: its rows are the whole set and come back unchanged.
    parts = [_rows(r) for r in range(2)]
    want_emb = collectives.all_gather_rows(np.concatenate([p[0] for p in parts]))
    want_idx = collectives.all_gather_rows(np.concatenate([p[1] for p in parts]))
    queries, gallery = _problem()
    want_knn = knn_search(queries, gallery, 8, query_block=4)
    for g in got:  # every rank receives everything
        np.testing.assert_array_equal(g["emb"], want_emb)
        np.testing.assert_array_equal(g["idx"], want_idx)
        assert g["emb"].dtype == np.float32 and g["idx"].dtype == np.int64
        # One list per rank, in rank order; merged they are the single-index top-k.
        s_all, i_all = g["topk_parts"]
        assert len(s_all) == 2 and i_all[0].max() < 12 <= i_all[1].min()
        s, i = merge_topk(s_all, i_all, 8)
        np.testing.assert_array_equal(i, want_knn[1])
        np.testing.assert_array_equal(s, want_knn[0])
        np.testing.assert_array_equal(g["knn"][1], want_knn[1])
        np.testing.assert_array_equal(g["knn"][0], want_knn[0])
        assert g["on_main"] == {"rank": 0}  # rank 0's result on every rank
    for rank in (0, 1):
        with open(f"{tmp_path / 'out'}.{rank}", "rb") as f:
            got = pickle.load(f)
        assert got["max"].tolist() == [1.0, 5.0, -1.0]  # elementwise over the ranks' values
        assert got["objects"] == [{"rank": 0, "skipped": []}, {"rank": 1, "skipped": ["x"]}]
        assert got["sum_over"].tolist() == [3.0]


def _on_main_error_job(rank: int, world_size: int, out: str) -> None:
    def fails() -> None:
        raise ValueError("bad protocol file")

    try:
        collectives.on_main(fails)
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
    # The group is still usable: nobody is left behind in the broadcast.
    total = collectives.all_reduce_sum(torch.ones(1)).item()
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{text}|{total}")


@pytest.mark.distributed
def test_an_error_on_rank_0_reaches_every_rank(tmp_path):
    run_distributed(_on_main_error_job, 2, str(tmp_path / "err"))
    rank0, rank1 = ((tmp_path / f"err.{r}").read_text() for r in range(2))
    # Every rank raises rank 0's own error (a user error stays one line on every rank).
    assert rank0 == "ValueError: bad protocol file|2.0"
    assert rank1 == "ValueError: bad protocol file|2.0"


def test_one_process_collectives_return_their_input():
    rows = np.arange(6, dtype=np.int64).reshape(3, 2)
    assert collectives.all_gather_rows(rows) is rows
    s, i = np.zeros((2, 3), np.float32), np.ones((2, 3), np.int64)
    assert collectives.all_gather_topk(s, i) == ([s], [i])
    assert collectives.on_main(lambda: 7) == 7
    t = torch.tensor([1.0, -2.0])
    assert collectives.all_reduce_max(t) is t
    assert collectives.all_gather_objects({"a": 1}) == [{"a": 1}]
    with pytest.raises(KeyError):  # one process: the error itself, not a wrapped one
        collectives.on_main(lambda: {}["x"])
    queries, gallery = _problem()
    index = ExactIPIndex(gallery)
    blocks = list(iter_sharded_knn(queries, index, 4, query_block=5))
    assert [b[0] for b in blocks] == [0, 5]


def test_process_group_builds_a_group_of_one_for_deepspeed_and_destroys_it(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    with group.process_group(timeout_s=30) as env:
        assert env.world_size == 1 and not dist.is_initialized()  # one process: no group
        group.ensure_process_group(timeout_s=30)
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert group.get_world_size() == 1 and not group.is_distributed()
        assert os.environ["LOCAL_RANK"] == "0"  # DeepSpeed reads it; srun does not set it
        group.ensure_process_group(timeout_s=30)  # idempotent: still the one group
    assert not dist.is_initialized()


def test_process_group_destroys_the_group_when_the_block_fails(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="boom"), group.process_group():
        group.ensure_process_group()
        raise RuntimeError("boom")
    assert not dist.is_initialized()


def test_a_group_that_existed_on_entry_is_left_to_its_owner(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    with group.process_group():
        group.ensure_process_group()
        with group.process_group():  # a nested entry point
            pass
        assert dist.is_initialized()
    assert not dist.is_initialized()


@pytest.mark.parametrize("bad", [0, -5, float("nan"), "60"])
def test_a_timeout_must_be_a_positive_number_of_seconds(bad):
    with pytest.raises(ValueError, match=r"timeout_s=.*positive number of seconds"):
        group.init(timeout_s=bad)


def _timeout_job(rank: int, world_size: int, out: str) -> None:
    failed = Path(f"{out}.failed")
    if rank == 1:
        # Alive but absent from the collective, like a hung host; it waits for rank 0's
        # verdict (bounded) so that rank 0 fails by timeout, not by a closed connection.
        deadline = time.monotonic() + 120
        while not failed.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    start = time.monotonic()
    try:
        dist.barrier()
        result = "returned"
    except RuntimeError as e:
        result = str(e)
    failed.write_text(f"{time.monotonic() - start:.1f}|{result}")


@pytest.mark.distributed
def test_init_timeout_bounds_every_collective(tmp_path):
    run_distributed(_timeout_job, 2, str(tmp_path / "t"), timeout_s=2)
    elapsed, message = (tmp_path / "t.failed").read_text().split("|", 1)
    assert message != "returned"
    assert "timed out" in message.lower() or "timeout" in message.lower(), message
    assert 1.5 <= float(elapsed) < 60
