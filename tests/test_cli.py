import subprocess
import sys


def test_pipeline_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("make-shards", "validate-shards", "train", "evaluate", "demo"):
        assert name in out


def test_importing_pipeline_does_nothing():
    # The package does no work on import: no torch, no environment reads.
    code = "import sys, pipeline, pipeline.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
