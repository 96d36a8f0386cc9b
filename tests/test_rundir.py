"""The run directory layout (pipeline/rundir.py)."""

from __future__ import annotations

from pipeline.config.runconfig import RunConfig
from pipeline.config.schema_services import EvalConfig
from pipeline.config.schema_train import TrainConfig
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


def test_eval_dir_names_the_files_of_an_evaluation(tmp_path):
    """Old evaluation folders keep reading: the rows are still written as index.npy."""
    from pipeline.rundir import EvalDir

    ev = EvalDir(tmp_path)
    assert ev.metrics == tmp_path / "metrics.json"
    assert ev.rows == tmp_path / "index.npy"
    assert ev.part(3) == tmp_path / "parts" / "part_00003.npz"
    assert ev.log_file(1) == tmp_path / "logs" / "rank1.log"
    ev.metrics.write_text('{"recall@1": 0.5}')
    assert ev.read_metrics() == {"recall@1": 0.5}


def test_run_dir_names_the_tracking_and_launch_records(tmp_path):
    run = RunDir(tmp_path)
    assert run.undelivered == tmp_path / "mlflow_undelivered.jsonl"
    assert run.launch_record(3) == tmp_path / "launch" / "rank3.json"
