"""Runs written before the trainer was split still resume: ``pipeline train`` on a copy of the
run folder in tests/fixtures/prechange_run (its config and its DeepSpeed checkpoint at step 2
of 4) continues from step 2 and ends with the weights that the code of that time produced."""

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
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = json.loads((FIXTURE / "expected.json").read_text())
    result = json.loads((run / "result.json").read_text())
    assert printed["step"] == result["step"] == expected["step"] == 4
    assert result["resumed_from"] == expected["resumed_from"] == 2
    weights = load_file(printed["weights"])
    assert sorted(weights) == sorted(expected["weights"])
    for name, (total, squares) in expected["weights"].items():
        t = weights[name].double()
        assert float(t.sum()) == pytest.approx(total, rel=1e-5, abs=1e-6), name
        assert float((t**2).sum()) == pytest.approx(squares, rel=1e-5, abs=1e-6), name
