"""Bad input a new user meets, each ending in one line that names the file, key or value, the
rule and the fix (or, for the served model, a named row and the rest embedded)."""

from __future__ import annotations

import io
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config.load import load_config
from pipeline.config.rules import load_checked
from pipeline.config.schema import ConfigError, DataConfig
from pipeline.data import converters
from pipeline.eval.protocols import preflight
from pipeline.model import build_model, load_trained_model
from pipeline.preflight import PreflightError
from pipeline.weights import ModelLoadError, save_weights
from tests.data_helpers import jpeg_bytes, layouts, write_image
from tests.tiny import IMAGE_SIZE, tiny_model_config

CFG = [f"data.image_size={IMAGE_SIZE}", f"data.resize_size={IMAGE_SIZE}", "data.num_workers=0"]


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------- shards


@pytest.fixture
def shards(synthetic_shards, tmp_path) -> Path:
    """A private copy of tiny synthetic shards (train and test), safe to damage."""
    src = synthetic_shards(classes=8, test_classes=4, images_per_class=8, samples_per_shard=32)
    return Path(shutil.copytree(src, tmp_path / "shards"))


def _rewrite(shard: Path, change) -> None:
    """Rewrite ``shard`` member by member with Python's tarfile, ``change(name, data)`` giving
    each member's new bytes."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            data = change(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_cls_that_is_not_an_integer_is_found_before_training(shards, tiny_config):
    shard = sorted((shards / "train").glob("*.tar"))[1]
    first = []

    def bad_cls(name: str, data: bytes) -> bytes:
        if name.endswith(".cls") and not first:
            first.append(name)
            return b"seven"
        return data

    _rewrite(shard, bad_cls)
    cfg = load_config(tiny_config(shards))
    with pytest.raises(
        PreflightError,
        match=rf"shard {shard}: member '{first[0]}': cls b'seven' is not an integer.*validate-shards",
    ):
        preflight(cfg, 1)


def test_damaged_member_header_of_a_full_size_shard_is_found_before_training(shards, tiny_config):
    shard = sorted((shards / "train").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[4].offset
    data = bytearray(shard.read_bytes())
    data[offset + 3] ^= 0x20  # one flipped bit in a member's name: same size, bad checksum
    shard.write_bytes(bytes(data))
    cfg = load_config(tiny_config(shards))
    with pytest.raises(
        PreflightError,
        match=rf"shard {shard}: the member header at byte {offset} is damaged \(checksum",
    ):
        preflight(cfg, 1)


def test_header_walk_names_a_cut_shard_and_passes_a_whole_one(shards, tmp_path):
    from pipeline.data.tarheaders import scan_shard

    shard = sorted((shards / "train").glob("*.tar"))[0]
    assert scan_shard(shard) is None
    with tarfile.open(shard) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: jpg.offset + 100])
    assert scan_shard(cut) == f"the file ends inside the member header at byte {jpg.offset}"
    cut.write_bytes(data[: jpg.offset_data + 10])
    assert (
        scan_shard(cut) == f"member {jpg.name!r} at byte {jpg.offset} runs past the end of the file"
    )
    cut.write_bytes(b"")
    assert scan_shard(cut) == "the file is empty"


def test_evaluation_split_of_one_class_is_refused(tmp_path, tiny_config, synthetic_shards):
    from tests.data_helpers import tiny_split

    one = tiny_split(tmp_path / "one", split="test", classes=1, per_class=6, size=IMAGE_SIZE)
    shards = synthetic_shards(classes=8, test_classes=4, images_per_class=8, samples_per_shard=32)
    cfg = load_config(tiny_config(shards), [f"data.eval_urls={one}"])
    with pytest.raises(
        PreflightError,
        match=r"6 samples of one class, so every other item is a positive and recall and mAP are 1.0",
    ):
        preflight(cfg, 1, train=False)


@pytest.mark.parametrize("name", ["retrieval", "vggface2"])
def test_evaluation_of_one_class_is_refused_where_preflight_could_not_count(name):
    """A split on an object store or without a catalog reaches the protocol's compute
    uncounted: the gathered labels are counted there."""
    import numpy as np

    from pipeline.config.schema import DataConfig
    from pipeline.config.schema_services import EvalConfig
    from pipeline.eval import protocols
    from pipeline.eval.extract import Embeddings

    emb = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    one = Embeddings(emb, np.zeros(6, np.int64), np.arange(6))
    data = DataConfig(eval_urls="s3://bucket/test")
    ev = EvalConfig(protocol=name, ks=[1], full_map=True)
    with pytest.raises(protocols.ProtocolDataError, match=r"6 samples of 1 class, so every other"):
        protocols.get(name).compute(one, data, ev, "cpu")
    two = Embeddings(emb, np.array([0, 0, 0, 1, 1, 1]), np.arange(6))
    assert 0 <= protocols.get(name).compute(two, data, ev, "cpu").metrics["recall@1"] <= 1


# ---------------------------------------------------------------------------- list files


# A list file, the line a case appends (``{}``: the path), the line number it lands on.
LIST_FILES = {
    "sop": ("Ebay_train.txt", "9 1 1 {}", 4, "train"),
    "inaturalist": ("Inaturalist_test_set1.txt", "{}", 3, "test"),
    "vggface2": ("train_list.txt", "{}", 5, "train"),
}


@pytest.mark.parametrize(
    ("dataset", "path"),
    [
        ("sop", "../outside/0.JPG"),
        ("sop", "/etc/passwd"),
        ("sop", "bicycle_final/../../x.JPG"),
        ("inaturalist", "../train_val2018/Aves/3/0.jpg"),
        ("inaturalist", "/train_val2018/Aves/3/0.jpg"),
        ("vggface2", "../0000_01.jpg"),
        ("vggface2", "../n000001/0000_01.jpg"),
        ("vggface2", "/n000002/0000_01.jpg"),
    ],
)
def test_list_path_that_leaves_root_is_refused_with_its_line(tmp_path, dataset, path):
    name, line, number, split = LIST_FILES[dataset]
    getattr(layouts, dataset)(tmp_path)
    with (tmp_path / name).open("a") as f:
        f.write(line.format(path) + "\n")
    lister = getattr(converters, f"list_{dataset}")
    with pytest.raises(
        converters.LayoutError, match=rf"{name}:{number}: path '{path}' leaves --root"
    ):
        lister(tmp_path, split)


# ---------------------------------------------------------------------------- config


def test_yaml_key_given_twice_names_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("optim:\n  lr: 0.1\ntrain:\n  epochs: 2\noptim:\n  lr: 0.2\n")
    with pytest.raises(
        ConfigError, match=r"twice.yaml.*key 'optim' is given twice, on line 1 and line 5"
    ):
        load_config(path)
    path.write_text("model:\n  backbone: a\n  embedding_dim: 4\n  backbone: b\n")
    with pytest.raises(ConfigError, match=r"key 'backbone' is given twice, on line 2 and line 4"):
        load_config(path)
    # The DeepSpeed file too (JSON is YAML): one line, so the columns tell them apart.
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 0}, "zero_optimization": {"stage": 1}}')
    with pytest.raises(
        ConfigError,
        match=r"ds.json is not valid YAML/JSON: key 'zero_optimization' is given twice, on line 1, columns 2 and 37",
    ):
        load_checked(None, [f"train.deepspeed_config={ds}"])


def test_override_of_a_list_element_says_how_to_pass_the_list():
    with pytest.raises(
        ConfigError, match=r"data.train is a list.*pass the whole list, e.g. data.train='\[\{name: "
    ):
        load_config(None, ["data.train.0.urls=/data/sop/train"])


# ---------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    return save_weights(model.state_dict(), model.architecture, path)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_in_weights_is_found_when_loading(weights, tmp_path, bad):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(weights))
    state["head.weight"][0, 0] = bad
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(
        ModelLoadError,
        match=r"bad.safetensors' holds NaN or infinite values in 1 tensors \(e.g. head.weight: ",
    ):
        load_trained_model(tmp_path / "bad.safetensors")


def test_export_refuses_an_extension_that_contradicts_the_format(weights, tmp_path):
    from pipeline.serve.export import ExportError, export_model

    model = load_trained_model(weights)
    with pytest.raises(
        ExportError, match=r"'.pt' says torchscript, but --format is onnx; name the file m.onnx"
    ):
        export_model(model, DataConfig(), "onnx", tmp_path / "m.pt")
    with pytest.raises(ExportError, match=r"'.onnx' says onnx, but --format is torchscript"):
        export_model(model, DataConfig(), "torchscript", tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- serving


def _mean_colour_onnx(path: Path) -> None:
    """A real ONNX graph (images NCHW -> per-channel means, N x 3): the pyfunc's row handling
    does not depend on the network."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["embeddings"]),
        ],
        "mean_colour",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "S", "S"])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def test_mlflow_model_names_the_row_that_is_not_an_image_and_embeds_the_rest(tmp_path, caplog):
    import pandas as pd

    from pipeline.serve import runtime as serving
    from pipeline.serve.export import preprocessing_spec

    _mean_colour_onnx(tmp_path / "m.onnx")
    spec = preprocessing_spec(DataConfig(image_size=IMAGE_SIZE, resize_size=IMAGE_SIZE), 3)
    pyfunc = serving.EmbeddingPyfunc()
    pyfunc.embedder = serving.OnnxEmbedder(tmp_path / "m.onnx", spec, threads=1)
    good = [jpeg_bytes(40, 30, seed=1), jpeg_bytes(30, 40, seed=2)]
    frame = pd.DataFrame({"image": [good[0], b"this is not an image", good[1]]})
    with caplog.at_level("WARNING", logger="smoothap.serving"):
        out = pyfunc.predict(None, frame)
    assert out.shape == (3, 3)
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(out[[0, 2]], pyfunc.embedder.embed(good))
    assert "row 1 is not an image" in caplog.text


# ---------------------------------------------------------------------------- CLI


def test_demo_refuses_fewer_than_one_process_at_once(tmp_path, capsys):
    for procs in ("0", "-1"):
        code = main(
            ["demo", "--procs", procs, "--data", str(tmp_path / "d"), "--runs", str(tmp_path)]
        )
        assert f"--procs {procs}: the demo trains in at least 1 process" in _one_line_error(
            capsys, code
        )
    assert not (tmp_path / "d").exists()


def test_search_json_does_not_overwrite_without_force(tmp_path, capsys):
    existing = tmp_path / "res.json"
    existing.write_text("mine\n")
    query = write_image(tmp_path / "q.jpg")
    code = main(["search", str(tmp_path / "gallery"), str(query), "--json", str(existing)])
    err = _one_line_error(capsys, code)
    assert f"--json {existing}: the file exists" in err and "--force" in err
    assert existing.read_text() == "mine\n"


def test_build_gallery_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "gallery"
    out.write_text("a file\n")
    code = main(
        [
            "build-gallery",
            "--weights",
            "m.safetensors",
            "--images",
            str(tmp_path),
            "--out",
            str(out),
        ]
    )
    assert f"--out '{out}' is a file" in _one_line_error(capsys, code)


def test_build_gallery_images_has_the_skipped_image_limit_of_make_shards(weights, tmp_path, capsys):
    folder = tmp_path / "images"
    for i in range(3):
        write_image(folder / "a" / f"{i}.jpg", seed=i)
    (folder / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    argv = ["build-gallery", "--weights", str(weights), *CFG, "--images", str(folder)]
    code = main([*argv, "--out", str(tmp_path / "g1")])
    err = _one_line_error(capsys, code)
    assert "1 of 4 images (25.0%) of --images" in err and "above the limit of 1.0%" in err
    assert "broken.jpg" in err and not (tmp_path / "g1").exists()
    # Raised, the limit lets the gallery through, with the skipped image listed.
    assert main([*argv, "--out", str(tmp_path / "g2"), "--max-skipped-fraction", "0.25"]) == 0
    assert "broken.jpg" in (tmp_path / "g2" / "skipped.txt").read_text()
