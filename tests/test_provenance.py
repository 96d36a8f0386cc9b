"""Provenance: the weights' identity, what a trained weights file records, ``pipeline
provenance``, the artefacts made from weights (evaluation, export, gallery) naming them, a
checkpoint root read at one step, and ``search`` refusing weights other than the gallery's.

References written here: the identity recomputed with ``struct`` and ``hashlib`` over each
tensor's float32 values in name order; the config digest from the run's saved config.yaml
(YAML read back, canonical JSON); the catalog digest from the bytes of index.parquet.

One real training run (2 steps of the tiny model, DeepSpeed on CPU in one gloo process,
tracking off, a checkpoint at each step) is shared by the module's slow tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import pipeline
from pipeline.cli import main
from pipeline.model import build_model, load_trained_model
from pipeline.weights import (
    MODEL_STATES,
    read_metadata,
    read_trained_weights,
    save_weights,
    weights_sha256,
)
from tests.data_helpers import write_image
from tests.dist_helpers import run_distributed
from tests.tiny import IMAGE_SIZE, tiny_model_config, tiny_run_config, write_config

STEPS = 2
SIZE = [f"data.image_size={IMAGE_SIZE}", f"data.resize_size={IMAGE_SIZE}", "data.num_workers=0"]


def reference_sha256(state: dict[str, torch.Tensor]) -> str:
    """The identity as specified, written out: in name order, a JSON header line then the
    float32 values packed little-endian one by one."""
    digest = hashlib.sha256()
    for name in sorted(k.removeprefix("module.") for k in state):
        tensor = state[name] if name in state else state["module." + name]
        values = tensor.detach().double().flatten().tolist()  # the exact float32 values
        data = struct.pack(f"<{len(values)}f", *values)
        header = json.dumps([name, "float32", list(tensor.shape), len(data)])
        digest.update(header.encode() + b"\n" + data)
    return digest.hexdigest()


def _train(rank: int, world: int, config: str) -> None:
    from pipeline.config.load import load_config
    from pipeline.train.entry import train

    torch.set_num_threads(1)
    train(load_config(config, []))


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_shards) -> dict[str, Path]:
    """A real 2-step run of the tiny model: checkpoints step_00000001 and step_00000002
    ('latest'), model.safetensors written by the final export, the final evaluation."""
    shards = synthetic_shards(classes=8, test_classes=4, images_per_class=8, samples_per_shard=64)
    tmp = tmp_path_factory.mktemp("prov")
    cfg = tiny_run_config(
        shards,
        tmp / "run",
        sampler={"samples_per_class": 4, "steps_per_epoch": STEPS, "shuffle_buffer_groups": 4},
        train={"epochs": 1, "checkpoint_every": 1, "keep_checkpoints": 2},
        eval={"ks": [1, 4], "batch_size": 64},
        tracking={"enabled": False},
    )
    config = write_config(tmp / "run.yaml", cfg)
    run_distributed(_train, 1, str(config))
    out = tmp / "run"
    return {"shards": shards, "dir": out, "ckpt": out / "checkpoints", "tmp": tmp}


def _checkpoint_state(tag: Path) -> dict[str, torch.Tensor]:
    return torch.load(tag / MODEL_STATES, map_location="cpu", weights_only=True)["module"]


def _copy_checkpoints(run: dict, dest: Path, latest: str) -> Path:
    """A copy of the run's checkpoints whose 'latest' names ``latest`` (the shared run is
    only read)."""
    root = shutil.copytree(run["ckpt"], dest)
    (root / "latest").write_text(latest)
    return root


# ---------------------------------------------------------------------------- identity


def test_identity_is_a_hash_of_the_float32_tensors_whatever_holds_them(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    state = model.state_dict()
    assert any(v.dtype == torch.int64 for v in state.values())  # BatchNorm's counters
    want = reference_sha256({k: v.float() for k, v in state.items()})
    assert weights_sha256(state) == want
    # The file and its metadata change nothing; the identity is stored in it.
    a = save_weights(state, model.architecture, tmp_path / "a.safetensors", {"run_id": "x"})
    b = save_weights(state, model.architecture, tmp_path / "b.safetensors", {"step": "7"})
    assert read_metadata(a)["weights_sha256"] == read_metadata(b)["weights_sha256"] == want
    assert a.read_bytes() != b.read_bytes()
    # A DataParallel-style torch file, bf16 tensors converted as save_weights converts them.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "m.pt")
    assert read_trained_weights(tmp_path / "m.pt")[3].weights_sha256 == want
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}
    assert weights_sha256(half) == reference_sha256({k: v.float() for k, v in half.items()})
    # One element changed: another identity.
    changed = dict(state)
    changed["head.bias"] = state["head.bias"].clone()
    changed["head.bias"][3] += 1e-6
    assert weights_sha256(changed) != want


@pytest.mark.slow  # the module's training run (about 8 s, once)
def test_trained_weights_record_their_origin_and_match_the_checkpoint(run):
    weights = run["dir"] / "model.safetensors"
    meta = read_metadata(weights)
    file_state, _, _, origin = read_trained_weights(weights)
    want = reference_sha256(file_state)
    # The same weights in the last checkpoint (fp32 module state) and in the export's file.
    assert reference_sha256(_checkpoint_state(run["ckpt"] / "step_00000002")) == want
    assert meta["weights_sha256"] == origin.weights_sha256 == want
    assert (meta["run_id"], meta["step"]) == ("", str(STEPS))  # tracking off: no MLflow run
    saved = yaml.safe_load((run["dir"] / "config.yaml").read_text())
    canonical = json.dumps(saved, sort_keys=True, separators=(",", ":"))
    assert meta["config_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    index = (run["shards"] / "train" / "index.parquet").read_bytes()
    assert json.loads(meta["catalog_sha256"]) == {"synthetic": hashlib.sha256(index).hexdigest()}
    commit = subprocess.run(
        ["git", "-C", str(Path(pipeline.__file__).parent), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert meta["code_version"].startswith(f"{pipeline.__version__}+g{commit[:12]}")
    assert json.loads(meta["preprocessing"])["crop"]["mode"] == "none"
    # The run's own final evaluation names the weights it measured.
    recorded = json.loads((run["dir"] / "eval" / "metrics.json").read_text())["weights"]
    assert (recorded["weights_sha256"], recorded["step"]) == (want, STEPS)


# ---------------------------------------------------------------------------- the command


@pytest.mark.slow  # the module's training run (about 8 s, once)
def test_provenance_command_prints_what_is_known_and_what_is_missing(run, tmp_path, capsys):
    weights = run["dir"] / "model.safetensors"
    assert main(["provenance", str(weights)]) == 0
    lines = capsys.readouterr().out.splitlines()
    identity = read_metadata(weights)["weights_sha256"]
    assert any(line.split() == ["weights_sha256", identity] for line in lines)
    assert any(line.split() == ["step", str(STEPS)] for line in lines)
    assert any(line.split() == ["missing", "[]"] for line in lines)

    # A checkpoint root: the tag 'latest' names, the identity computed from its tensors.
    assert main(["provenance", str(run["ckpt"]), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["path"] == str(run["ckpt"] / "step_00000002")
    assert (got["resolved_from"], got["weights_sha256"]) == (str(run["ckpt"]), identity)
    assert (got["run_id"], got["step"]) == ("", STEPS)

    # A plain state dict someone saved: it loads, and its provenance says what is missing.
    state, _ = load_trained_model(weights).state_dict(), None
    save_file({k: v.float() for k, v in state.items()}, str(tmp_path / "plain.safetensors"))
    model = load_trained_model(tmp_path / "plain.safetensors", tiny_model_config())
    assert model.weights_origin.weights_sha256 == identity and model.weights_origin.step is None
    assert main(["provenance", str(tmp_path / "plain.safetensors"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["weights_sha256"] == identity
    assert got["missing"] == [
        "run_id",
        "step",
        "config_sha256",
        "catalog_sha256",
        "code_version",
        "preprocessing",
    ]


# ---------------------------------------------------------------------------- artefacts


@pytest.mark.slow  # the module's training run (about 8 s, once)
def test_export_and_evaluate_of_a_checkpoint_root_record_the_step_read(run, tmp_path, capsys):
    root = _copy_checkpoints(run, tmp_path / "ckpt", "step_00000001")
    tag = root / "step_00000001"
    identity = reference_sha256(_checkpoint_state(tag))
    assert identity != reference_sha256(_checkpoint_state(root / "step_00000002"))
    model_file = tmp_path / "m.pt"
    argv = ["export", "--weights", str(root), *SIZE, "--format", "torchscript"]
    assert main([*argv, "--out", str(model_file)]) == 0
    err = capsys.readouterr().err
    assert f"weights: {root} -> step_00000001 (weights sha256 {identity[:12]}, step 1)" in err
    spec = json.loads((tmp_path / "m.preprocessing.json").read_text())
    assert spec["weights"] == {
        "path": str(tag),
        "weights_sha256": identity,
        "run_id": "",
        "step": 1,
    }
    # The exported graph holds the same weights: the same identity, checked by the command.
    exported = torch.jit.load(str(model_file)).state_dict()
    assert reference_sha256(exported) == identity
    assert main(["provenance", str(model_file), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tensors_match_record"] is True and shown["weights_sha256"] == identity

    out = tmp_path / "eval"
    argv = ["evaluate", "--weights", str(root), *SIZE, "tracking.enabled=false"]
    argv += [f"data.eval_urls={run['shards'] / 'test'}", f"eval.output_dir={out}", "eval.ks=[1]"]
    assert main(argv) == 0
    recorded = json.loads((out / "metrics.json").read_text())["weights"]
    assert recorded == spec["weights"]


def _photos(folder: Path) -> Path:
    for c in ("cats", "dogs"):
        for i in range(3):
            write_image(folder / c / f"{i}.jpg", 40 + i, 30, seed=len(c) * 10 + i)
    return folder


@pytest.mark.slow  # the module's training run (about 8 s, once)
def test_search_refuses_other_weights_than_the_gallerys(run, tmp_path, capsys):
    # The gallery is built while 'latest' names step 1; the run then goes on to step 2.
    root = _copy_checkpoints(run, tmp_path / "ckpt", "step_00000001")
    tag = root / "step_00000001"
    identity = reference_sha256(_checkpoint_state(tag))
    photos, gallery = _photos(tmp_path / "photos"), tmp_path / "gallery"
    argv = ["build-gallery", "--weights", str(root), *SIZE, "--images", str(photos)]
    assert main([*argv, "--out", str(gallery)]) == 0
    assert f"weights: {root} -> step_00000001" in capsys.readouterr().err
    manifest = json.loads((gallery / "manifest.json").read_text())
    assert manifest["checkpoint"] == str(tag)
    assert manifest["weights"]["weights_sha256"] == identity and manifest["weights"]["step"] == 1
    (root / "latest").write_text("step_00000002")
    other = reference_sha256(_checkpoint_state(root / "step_00000002"))

    query = photos / "dogs" / "1.jpg"
    res = tmp_path / "res.json"
    search = ["search", str(gallery), str(query), "--k", "2", "--json", str(res), "--force"]
    assert main([*search, "--checkpoint", str(root)]) == 2
    said, err = capsys.readouterr().err.strip().splitlines()
    assert said.startswith(f"weights: {root} -> step_00000002 (weights sha256 {other[:12]}")
    assert "--allow-other-weights" in err
    assert f"{tag} (sha256 {identity[:12]})" in err
    assert f"{root / 'step_00000002'} (sha256 {other[:12]})" in err

    assert main([*search, "--checkpoint", str(root), "--allow-other-weights"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("weights_match: false (") and "warning" in captured.err
    hit = json.loads(res.read_text())[0]
    assert (hit["weights_match"], hit["gallery_weights_sha256"]) == (False, identity)
    assert hit["query_weights_sha256"] == other
    other_scores = [h["score"] for h in hit["neighbours"]]

    # The gallery's own weights (the manifest's tag): itself at 1.0, the match recorded.
    assert main(search) == 0
    hit = json.loads(res.read_text())[0]
    assert hit["weights_match"] is True and hit["query_weights_sha256"] == identity
    assert hit["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [h["score"] for h in hit["neighbours"]] != other_scores  # other weights, other scores
    capsys.readouterr()
    assert main(["provenance", str(gallery), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights_sha256"] == identity

    # A gallery built before galleries recorded an identity: searched, with a warning.
    del manifest["weights"]
    (gallery / "manifest.json").write_text(json.dumps(manifest))
    assert main(search) == 0
    assert "records no weights identity" in capsys.readouterr().err
    assert json.loads(res.read_text())[0]["weights_match"] is None


def test_a_path_without_weights_is_a_one_line_error(tmp_path, capsys):
    from pipeline.serve.show_provenance import ProvenanceError, provenance_of

    with pytest.raises(ProvenanceError, match=r"'.*nope' does not exist; pass a weights file"):
        provenance_of(tmp_path / "nope")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(ProvenanceError, match=r"m.onnx: an ONNX file keeps no provenance .* "):
        provenance_of(tmp_path / "m.onnx")
    (tmp_path / "notes.txt").write_text("not weights")
    assert main(["provenance", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.txt" in err and "state dict" in err
