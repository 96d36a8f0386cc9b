"""Distributed evaluation across hosts, for tests/test_multinode.py.

    python -m tests.cluster.eval_probe CONFIG WEIGHTS OUT_DIR K [TRACKING_URI RUN_ID]

Every rank (one process, or every task of ``srun``) embeds its share of ``data.eval_urls`` with
``pipeline.eval.extract.extract_embeddings`` and searches every query against its gallery slice
with the rank-sharded ``pipeline.eval.knn.knn_search`` (all ranks participate in both). Rank 0
writes OUT_DIR/knn.npz (embeddings, catalog rows, scores, ids); every rank writes
OUT_DIR/rank<R>.json (host, gallery slice). With TRACKING_URI and RUN_ID, each host's local
rank 0 samples its system metrics into that run meanwhile (pipeline.tracking.sysmetrics).
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.config.load import load_config
from pipeline.distributed import collectives, group
from pipeline.eval.extract import extract_embeddings
from pipeline.eval.knn import gallery_slice, knn_search
from pipeline.model import load_trained_model
from pipeline.tracking import sysmetrics


def main(config: str, weights: str, out_dir: str, k: int, uri: str = "", run_id: str = "") -> None:
    torch.set_num_threads(1)
    env = group.init(timeout_s=120)
    monitor = sysmetrics.start(
        run_id or None, tracking_uri=uri, local_rank=env.local_rank, interval_s=0.2
    )
    try:
        cfg = load_config(config)
        model = load_trained_model(weights, cfg.model)
        e = extract_embeddings(
            model, cfg.data.eval_urls, cfg.data, device="cpu", batch_size=16, progress=False
        )
        scores, ids = knn_search(e.emb_ND, e.emb_ND, k, gpus=[])
    finally:
        monitor.stop()
    out = Path(out_dir)
    rank, world = group.get_rank(), group.get_world_size()
    lo, hi = gallery_slice(len(e.row_N), rank, world)
    facts = {"host": socket.gethostname(), "world": world, "slice": [lo, hi]}
    (out / f"rank{rank}.json").write_text(json.dumps(facts))
    if rank == 0:
        np.savez(out / "knn.npz", emb=e.emb_ND, index=e.row_N, scores=scores, ids=ids)
    collectives.barrier()  # all ranks participate: the files exist when the step ends
    group.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:7])
