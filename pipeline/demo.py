"""``pipeline demo``: the whole pipeline on one CPU machine in a few minutes.

1. writes the built-in synthetic shards if they are absent (``pipeline make-shards synthetic``);
2. evaluates the untrained model on the held-out classes (the exact initial weights of the
   training run: same ``train.seed``);
3. trains it with 2 processes (``torchrun``: DeepSpeed's CPU accelerator, gloo), which
   evaluates again at the end;
4. prints R@1, R@4 and mAP@R untrained vs trained, and the command that opens MLflow on the
   run (both evaluations are in it: the untrained one at step 0).

Every demo run trains into a fresh ``runs/demo-<time>/``; the MLflow store is shared, so the
runs line up in one UI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.config_loader import CONF_DIR, load_config

DEFAULT_CONFIG = CONF_DIR / "demo.yaml"
TABLE_METRICS = ("recall@1", "recall@4", "map@r")
TARGET_GAIN = 0.2
"""The demo's promise: trained mAP@R at least this much above the untrained model's."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (conf/demo.yaml)")
    parser.add_argument(
        "--data", default="data/synthetic", help="synthetic shards (written if absent)"
    )
    parser.add_argument("--runs", default="runs", help="where runs/demo-<time>/ goes")
    parser.add_argument("--procs", type=int, default=2, help="training processes (gloo on CPU)")
    syn = parser.add_argument_group("synthetic shards (when they are written)")
    syn.add_argument("--classes", type=int, default=500, help="train classes")
    syn.add_argument("--test-classes", type=int, default=100, help="held-out classes")
    syn.add_argument("--images-per-class", type=int, default=20)
    syn.add_argument("--image-size", type=int, default=64)
    syn.add_argument(
        "--samples-per-shard", type=int, default=1000, help="every rank needs its own shards"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def _write_shards(args: argparse.Namespace) -> None:
    from pipeline.cli import main as cli

    data = Path(args.data)
    if (data / "train" / "index.parquet").is_file() and (data / "test" / "index.parquet").is_file():
        print(f"[demo] using the synthetic shards in {data}")
        return
    print(f"[demo] writing synthetic shards to {data} ...", flush=True)
    argv = [
        "make-shards",
        "synthetic",
        "--out",
        str(data),
        "--classes",
        str(args.classes),
        "--test-classes",
        str(args.test_classes),
        "--images-per-class",
        str(args.images_per_class),
        "--image-size",
        str(args.image_size),
        "--samples-per-shard",
        str(args.samples_per_shard),
        "--workers",
        str(max(os.cpu_count() or 1, 1)),
        "--no-progress",
    ]
    if cli(argv) != 0:
        raise SystemExit("[demo] writing the synthetic shards failed (see above)")


def _untrained_metrics(cfg: RunConfig) -> dict[str, float]:
    """Metrics of the model the training run starts from (one process)."""
    import torch

    from pipeline.eval.evaluator import evaluate_model
    from pipeline.model import build_model

    torch.manual_seed(cfg.train.seed)  # what pipeline.train.trainer does before building the model
    model = build_model(cfg.model).eval()
    return evaluate_model(model, cfg.data, cfg.eval, device="cpu", progress=False)


def _table(before: dict[str, float], after: dict[str, float]) -> str:
    head = f"{'':<12}" + "".join(f"{m:>10}" for m in TABLE_METRICS)
    rows = [
        f"{name:<12}" + "".join(f"{vals[m]:>10.3f}" for m in TABLE_METRICS)
        for name, vals in (("untrained", before), ("trained", after))
    ]
    gain = f"{'gain':<12}" + "".join(f"{after[m] - before[m]:>+10.3f}" for m in TABLE_METRICS)
    return "\n".join([head, *rows, gain])


def run(args: argparse.Namespace) -> int:
    from pipeline.tracking import make_tracker, ui_command
    from pipeline.train.trainer import RESULT_FILE, RUN_ID_FILE

    start = time.time()
    data = Path(args.data)
    out = Path(args.runs) / time.strftime("demo-%Y%m%d-%H%M%S")
    overrides = [
        f"data.train=[{{name: synthetic, urls: {data / 'train'}}}]",
        f"data.eval_urls={data / 'test'}",
        f"train.output_dir={out}",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    _write_shards(args)

    print("[demo] evaluating the untrained model on the held-out classes ...", flush=True)
    before = _untrained_metrics(cfg)
    # The run starts here, with the untrained evaluation at step 0; `pipeline train`
    # continues it (it reads the run id from <output_dir>/mlflow_run.txt).
    tracker = make_tracker(
        replace(cfg.tracking, run_name=cfg.tracking.run_name or out.name), is_main=True
    )
    tracker.log_metrics({f"eval/{k}": v for k, v in before.items()}, 0)
    tracker.set_tags({"demo": "true"})
    out.mkdir(parents=True, exist_ok=True)
    if tracker.run_id:
        (out / RUN_ID_FILE).write_text(tracker.run_id)

    print(f"[demo] training with {args.procs} processes (DeepSpeed on CPU, gloo) ...", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.procs}",
        "-m",
        "pipeline.cli",
        "train",
        "--config",
        args.config,
        *overrides,
        f"tracking.uri={tracker.uri}" if tracker.uri else "tracking.enabled=false",
    ]
    cores = os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(cores // args.procs, 1)))
    import torch

    if not torch.cuda.is_available():
        # Naming DeepSpeed's CPU accelerator skips its GPU probe (and its warning).
        env.setdefault("DS_ACCELERATOR", "cpu")
    if subprocess.run(cmd, env=env).returncode != 0:
        tracker.finish("FAILED")
        raise SystemExit(f"[demo] training failed; its files are in {out}")
    result = json.loads((out / RESULT_FILE).read_text())
    after = result["metrics"]

    gain = after["map@r"] - before["map@r"]
    verdict = "met" if gain >= TARGET_GAIN else "NOT met"
    print()
    print(_table(before, after))
    print(
        f"\n[demo] mAP@R gain {gain:+.3f} (target +{TARGET_GAIN}: {verdict}); "
        f"{result['step']} steps; total {time.time() - start:.0f} s"
    )
    print(f"[demo] run directory: {out}  (weights: {result['weights']})")
    if tracker.run_id:
        print(f"[demo] MLflow run {tracker.run_id}; open it with:\n    {ui_command(tracker.uri)}")
    (out / "demo.json").write_text(
        json.dumps(
            {"untrained": before, "trained": after, "seconds": time.time() - start}, indent=1
        )
    )
    return 0
