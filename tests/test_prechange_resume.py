"""Runs written before the trainer was split still resume: ``pipeline train``'s own steps, on
a copy of the run folder in tests/fixtures/prechange_run (its config and its DeepSpeed
checkpoint at step 2 of 4), load that checkpoint bitwise (every tensor of the model as the old
code saved it) and train on from step 2 to the end in the same run folder.

The fixture's ``expected.json`` also records the final weights the code of that time reached;
they are no longer compared: the training stream now draws each sample's augmentation from a
generator of its own (pipeline.data.threaded), so steps 3 and 4 see other crops than they did
then. What an old run folder must keep is its format, which this test checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / "fixtures" / "prechange_run"

pytestmark = pytest.mark.distributed  # DeepSpeed in a subprocess


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    # The shards the fixture's run trained on (the generator derives each image from its ids).
    return synthetic_shards(classes=8, test_classes=4, images_per_class=4, samples_per_shard=16)


def test_a_prechange_run_folder_resumes_to_the_same_weights(shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    config = run / "config.yaml"
    text = config.read_text().replace("SHARDS", str(shards)).replace("RUN", str(run))
    config.write_text(text)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-c", RESUME, str(config), str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = json.loads((FIXTURE / "expected.json").read_text())
    result = json.loads((run / "result.json").read_text())
    # Every tensor of the old checkpoint's model, as the resumed trainer holds it at step 2.
    assert report["resumed_at"] == expected["resumed_from"] == 2
    assert report["tensors"] == len(expected["weights"])
    assert report["differing"] == []
    assert report["step"] == result["step"] == expected["step"] == 4
    assert result["resumed_from"] == 2
    weights = load_file(result["weights"])
    assert sorted(weights) == sorted(expected["weights"])
    assert all(bool(t.isfinite().all()) for t in weights.values())


# The entry point's own steps (pipeline.train.entry.run / train), with a look at the model
# right after the resume: the old checkpoint's model states read by torch, tensor by tensor.
RESUME = """
import json, sys
from dataclasses import replace
from pathlib import Path
import torch
from pipeline.config.rules import load_checked
from pipeline.data.transforms import resolve_crop
from pipeline.distributed import group
from pipeline.train.entry import open_trainer

config, run = sys.argv[1], Path(sys.argv[2])
cfg = load_checked(config)
cfg = replace(cfg, data=resolve_crop(cfg.data, train=True))
saved = run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
old = torch.load(saved, map_location="cpu", weights_only=False)["module"]
with group.process_group(timeout_s=cfg.train.collective_timeout_s):
    with open_trainer(cfg) as trainer:
        now = trainer.engine.module.state_dict()
        differing = sorted(k for k in old if k not in now or not torch.equal(old[k], now[k]))
        resumed_at = trainer.step
        result = trainer.train()
print(json.dumps({"resumed_at": resumed_at, "tensors": len(old), "differing": differing,
                  "step": result["step"]}))
"""
