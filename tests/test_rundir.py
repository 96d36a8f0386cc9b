"""The run directory layout (pipeline/rundir.py)."""

from __future__ import annotations

from pipeline.config.schema import EvalConfig, RunConfig, TrainConfig
from pipeline.rundir import RunDir, eval_output_dir


def test_paths_and_small_files(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.read_run_id() is None and run.read_result() is None
    assert not run.root.exists()  # nothing is created before a write
    run.write_run_id("abc")
    run.write_result({"step": 3})
    assert run.read_run_id() == "abc" and run.read_result() == {"step": 3}
    assert sorted(p.name for p in run.root.iterdir()) == ["mlflow_run.txt", "result.json"]
    assert run.log_file(5) == run.root / "logs" / "rank5.log"
    assert run.checkpoints == run.root / "checkpoints"


def test_eval_output_dir_defaults_to_the_run_directory(tmp_path):
    cfg = RunConfig(train=TrainConfig(output_dir=str(tmp_path / "run")))
    assert eval_output_dir(cfg) == tmp_path / "run" / "eval"
    other = RunConfig(train=cfg.train, eval=EvalConfig(output_dir=str(tmp_path / "e")))
    assert eval_output_dir(other) == tmp_path / "e"
