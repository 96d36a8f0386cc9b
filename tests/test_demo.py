"""`pipeline demo` end to end on tiny settings: shards written, untrained evaluation, 2-process
training, the table, and one MLflow run holding both evaluations."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_demo_runs_end_to_end(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "demo",
        "--data",
        str(tmp_path / "data"),
        "--runs",
        str(tmp_path / "runs"),
        "--classes",
        "12",
        "--test-classes",
        "6",
        "--images-per-class",
        "8",
        "--image-size",
        "32",
        "--samples-per-shard",
        "16",
        "data.image_size=32",
        "data.resize_size=32",
        "data.num_workers=0",
        "model.backbone=test_byobnet",
        "model.embedding_dim=16",
        "sampler.classes_per_batch=4",
        "sampler.steps_per_epoch=4",
        "sampler.shuffle_buffer_groups=8",
        "eval.ks=[1,4]",
        "eval.batch_size=64",
        f"tracking.uri={uri}",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun then stops its workers (they run in their own sessions).
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the demo took more than 300 s:\n{out[-2000:]}\n{err[-2000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "writing synthetic shards" in err  # progress is logged (stderr); the report is stdout
    (run_dir,) = (tmp_path / "runs").glob("demo-*")
    # Every process logs into the run directory: the demo and both training ranks.
    assert "writing synthetic shards" in (run_dir / "logs" / "rank0.log").read_text()
    assert "step 4/4: loss" in (run_dir / "logs" / "rank1.log").read_text()
    assert (tmp_path / "data" / "train" / "index.parquet").is_file()

    numbers = json.loads((run_dir / "demo.json").read_text())
    before, after = numbers["untrained"], numbers["trained"]
    # The printed table carries exactly these numbers.
    rows = {
        m.group(1): [float(x) for x in m.group(2).split()]
        for m in re.finditer(r"^(untrained|trained)\s+([-\d.\s]+)$", out, re.M)
    }
    for name, vals in (("untrained", before), ("trained", after)):
        assert rows[name] == [round(vals[k], 3) for k in ("recall@1", "recall@4", "map@r")]
    assert re.search(r"mAP@R gain [-+]\d\.\d{3} \(target \+0.2: (met|NOT met)\)", out)
    assert f"mlflow ui --backend-store-uri {uri}" in out

    # One run with the untrained evaluation at step 0 and the trained one at the last step.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = (run_dir / "mlflow_run.txt").read_text().strip()
    history = client.get_metric_history(run_id, "eval/map_at_r")
    assert sorted((m.step, m.value) for m in history) == [
        (0, pytest.approx(before["map@r"])),
        (4, pytest.approx(after["map@r"])),
    ]
    assert len(client.get_metric_history(run_id, "train/loss")) >= 1
    assert client.get_run(run_id).info.status == "FINISHED"


def test_demo_never_replaces_a_split_already_in_its_data_folder(tmp_path):
    """--data may name a folder holding the user's own shards: a split already there (here
    train/ without test/) is refused in one line, and nothing in it is touched."""
    import argparse

    from pipeline import demo
    from pipeline.errors import UserError

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "index.parquet").write_text("the user's index")
    args = argparse.Namespace(
        data=str(tmp_path),
        classes=4,
        test_classes=2,
        images_per_class=4,
        image_size=32,
        samples_per_shard=16,
    )
    with pytest.raises(UserError, match="train already exists; pass --overwrite"):
        demo._write_shards(args)
    assert [p.name for p in (tmp_path / "train").iterdir()] == ["index.parquet"]
    assert (tmp_path / "train" / "index.parquet").read_text() == "the user's index"
