"""``pipeline export``: ONNX (onnxruntime, CPU provider), TorchScript and the MLflow pyfunc
model give the project's own embeddings of real JPEG/PNG files written here.

Reference: ``decode_image`` + ``eval_transform`` + ``EmbeddingModel`` in torch (the path of
``pipeline evaluate``), one image per forward. Observed max abs differences (float32, 16-d unit
vectors): ONNX ~5e-7, TorchScript ~0, MLflow pyfunc ~6e-7; asserted below 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config.schema import DataConfig
from pipeline.config.schema_train import ModelConfig
from pipeline.data.transforms import decode_image, draft_side, eval_transform
from pipeline.model import build_model, load_trained_model
from pipeline.weights import save_weights
from tests.data_helpers import write_image

SIZE, RESIZE = 32, 36
TOL = 1e-5
# (width, height, suffix): JPEGs larger than twice RESIZE take libjpeg's reduced-scale decode.
IMAGES = [
    (100, 80, ".jpg"),
    (40, 61, ".jpg"),
    (36, 36, ".png"),
    (150, 97, ".jpeg"),
    (37, 90, ".jpg"),
]
CFG = [f"data.image_size={SIZE}", f"data.resize_size={RESIZE}"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", embedding_dim=16))
    weights = save_weights(model.state_dict(), model.architecture, root / "model.safetensors")
    files = [
        write_image(root / "images" / f"img{i}{suffix}", w, h, seed=i)
        for i, (w, h, suffix) in enumerate(IMAGES)
    ]
    return {"root": root, "weights": weights, "files": files, "want": _reference(weights, files)}


def _data_cfg() -> DataConfig:
    return DataConfig(image_size=SIZE, resize_size=RESIZE)


def _reference(weights: Path, files: list[Path]) -> np.ndarray:
    model = load_trained_model(weights)
    transform = eval_transform(_data_cfg())
    side = draft_side(_data_cfg(), train=False)
    with torch.no_grad():
        rows = [model(transform(decode_image(f.read_bytes(), side))[None])[0] for f in files]
    return torch.stack(rows).numpy()


def _inputs(files: list[Path]) -> np.ndarray:
    transform = eval_transform(_data_cfg())
    side = draft_side(_data_cfg(), train=False)
    return torch.stack([transform(decode_image(f.read_bytes(), side)) for f in files]).numpy()


def test_onnx_and_torchscript_equal_the_torch_model(assets, tmp_path, capsys):
    import onnxruntime as ort

    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m_ts.pt")):
        code = main(
            [
                "export",
                "--weights",
                str(assets["weights"]),
                *CFG,
                "--format",
                fmt,
                "--out",
                str(tmp_path / name),
            ]
        )
        assert code == 0
    spec = json.loads((tmp_path / "m.preprocessing.json").read_text())
    assert spec["input_size"] == [SIZE, SIZE] and spec["resize_shorter_side"] == RESIZE
    assert spec["channel_order"] == "RGB" and spec["embedding_dim"] == 16
    assert spec["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert spec["std"] == pytest.approx([0.229, 0.224, 0.225])

    x = _inputs(assets["files"])
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(tmp_path / "m_ts.pt"))
    for batch in (x[:1], x):  # batch 1 and batch 5 through the same graph
        n = len(batch)
        onnx_out = session.run(["embeddings"], {"images": batch})[0]
        with torch.no_grad():
            ts_out = scripted(torch.from_numpy(batch)).numpy()
        d_onnx = np.abs(onnx_out - assets["want"][:n]).max()
        d_ts = np.abs(ts_out - assets["want"][:n]).max()
        print(
            f"batch {n}: max |onnx - torch| = {d_onnx:.2e}, max |torchscript - torch| = {d_ts:.2e}"
        )
        assert d_onnx < TOL and d_ts < TOL
        np.testing.assert_allclose(np.linalg.norm(onnx_out, axis=1), 1.0, atol=1e-6)


def test_serving_preprocessing_equals_the_eval_transform(assets, tmp_path):
    """pipeline.serve.runtime (NumPy + Pillow, no torch) against torchvision's eval transform."""
    from pipeline.serve import export, runtime
    from pipeline.serve.export import export_model
    from pipeline.serve.runtime import OnnxEmbedder, read_spec, to_array

    assert runtime.IMAGE_COLUMN == export.IMAGE_COLUMN  # runtime imports nothing of the package
    assert export.RUNTIME_CODE.samefile(runtime.__file__)

    model = load_trained_model(assets["weights"])
    onnx_file, spec_file = export_model(model, _data_cfg(), "onnx", tmp_path / "m.onnx")
    spec = read_spec(spec_file)  # checks the format: serving's SPEC_FORMAT is export's
    want = _inputs(assets["files"])
    for i, f in enumerate(assets["files"]):
        np.testing.assert_allclose(to_array(f.read_bytes(), spec), want[i], atol=1e-5)
    embedder = OnnxEmbedder(onnx_file, spec)
    got = embedder.embed([f.read_bytes() for f in assets["files"]], batch_size=2)
    assert np.abs(got - assets["want"]).max() < TOL
    # An HxWx3 uint8 array is the decoded image (no JPEG draft: a PNG, not downscaled on decode).
    from PIL import Image

    arr = np.asarray(Image.open(assets["files"][2]).convert("RGB"))
    assert np.abs(embedder.embed([arr]) - assets["want"][2:3]).max() < TOL


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_format_is_a_one_line_error(assets, tmp_path, capsys):
    code = main(
        [
            "export",
            "--weights",
            str(assets["weights"]),
            "--format",
            "tflite",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert code == 2
    err = _one_line_error(capsys)
    assert "--format 'tflite' is not supported; use one of onnx, torchscript" in err
    assert not list(tmp_path.iterdir())


def test_format_without_out_is_a_one_line_error(assets, capsys):
    assert main(["export", "--weights", str(assets["weights"]), "--format", "onnx"]) == 2
    assert "--format and --out go together" in _one_line_error(capsys)


def test_checkpoint_of_another_architecture_is_a_one_line_error(assets, tmp_path, capsys):
    for override in ("model.backbone=resnet10t", "model.embedding_dim=32"):
        code = main(
            [
                "export",
                "--weights",
                str(assets["weights"]),
                override,
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "m.onnx"),
            ]
        )
        assert code == 2
        err = _one_line_error(capsys)
        assert "holds a resnet18 model with embedding_dim=16" in err and override in err.replace(
            "'", ""
        )


def test_existing_output_is_not_overwritten(assets, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_text("mine")
    argv = [
        "export",
        "--weights",
        str(assets["weights"]),
        *CFG,
        "--format",
        "onnx",
        "--out",
        str(out),
    ]
    assert main(argv) == 2
    assert f"{out} exists" in _one_line_error(capsys)
    assert out.read_text() == "mine"


_LOADER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import mlflow
    import numpy as np
    import pandas as pd

    uri, model_uri, out, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({"image": [Path(f).read_bytes() for f in files]})
    np.save(out, model.predict(frame))
    """
)


@pytest.mark.slow
def test_mlflow_model_loads_in_another_process_from_the_registry(assets, tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["export", "--weights", str(assets["weights"]), *CFG, f"tracking.uri={uri}", "--mlflow"]
    for _ in range(2):  # a new version per call
        assert main([*argv, "--register-model", "faces"]) == 0
    out = capsys.readouterr().out
    assert "registered models:/faces/2" in out and "mlflow ui --backend-store-uri" in out
    client = MlflowClient(tracking_uri=uri)
    assert sorted(int(v.version) for v in client.search_model_versions("name='faces'")) == [1, 2]
    # The model names the weights it was made from (its MLmodel metadata, the run's tags).
    import mlflow.models

    identity = load_trained_model(assets["weights"]).weights_origin.weights_sha256
    with _tracking_uri(uri):
        info = mlflow.models.get_model_info("models:/faces/2")
    assert info.metadata["weights_sha256"] == identity
    assert info.metadata["path"] == str(assets["weights"])
    assert client.get_run(info.run_id).data.tags["weights_sha256"] == identity

    # Another process, no pipeline on its path, every proxy pointing at a closed port: loading
    # from the registry must not resolve packages or reach the network.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    script = tmp_path / "load.py"
    script.write_text(_LOADER)
    result = tmp_path / "emb.npy"
    files = [str(f) for f in assets["files"]]
    proc = subprocess.run(
        [sys.executable, str(script), uri, "models:/faces/2", str(result), *files],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(result)
    diff = np.abs(got - assets["want"]).max()
    print(f"max |mlflow pyfunc - torch| = {diff:.2e}")
    assert got.shape == (len(files), 16) and diff < TOL
    # The declared environment is exactly what was pinned (nothing inferred).
    import mlflow.pyfunc

    with _tracking_uri(uri):
        reqs = Path(mlflow.pyfunc.get_model_dependencies("models:/faces/2")).read_text().split()
    assert {r.split("==")[0] for r in reqs} == {
        "mlflow",
        "onnxruntime",
        "numpy",
        "pillow",
        "pandas",
    }


def _tracking_uri(uri: str):
    from pipeline.serve.export import _mlflow_uri

    return _mlflow_uri(uri)
