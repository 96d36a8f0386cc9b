"""Run by every task of a multi-host job: join the process group, all-reduce, and write what
this rank saw (rank variables, host, the sum) to OUT_DIR/rank{RANK}.json."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.distributed import group

NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK")
NAMES += ("MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")


def main(out_dir: Path) -> None:
    env = group.init(timeout_s=60)
    total = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(total)  # all ranks participate
    host = socket.gethostname()
    facts = {
        "env": {k: os.environ.get(k) for k in NAMES},
        "read_env": {"local_world_size": env.local_world_size, "node_rank": env.node_rank},
        "hostname": host,
        # The address gloo advertises for this rank (it resolves the hostname).
        "address": socket.gethostbyname(host),
        "sum": total.item(),
        "backend": dist.get_backend(),
    }
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(facts))
    group.destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
