import subprocess
import sys

import pytest


def test_pipeline_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("make-shards", "validate-shards", "train", "evaluate", "demo"):
        assert name in out


def test_importing_pipeline_does_nothing():
    # The package does no work on import: no torch, no environment reads.
    code = "import sys, pipeline, pipeline.config.schema, pipeline.config.load; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow  # end to end: one CLI process per bad input
def test_bad_input_is_one_line_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--config"]
    proc = subprocess.run([*cmd, str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "pipeline train: error: config file" in proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "ok.yaml").write_text("loss:\n  temperature: 0.1\n")
    proc = subprocess.run(
        [*cmd, str(tmp_path / "ok.yaml"), "loss.temp=3"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown config key 'loss.temp'; valid keys of loss: temperature" in proc.stderr
