"""``pipeline evaluate`` and ``evaluate_model`` on tiny real shards, 1 and 2 gloo processes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config.load import split_weights
from pipeline.config.schema import ConfigError, DataConfig
from pipeline.config.schema_services import EvalConfig
from pipeline.config.schema_train import ModelConfig
from pipeline.eval.evaluator import evaluate_model
from pipeline.model import build_model, load_trained_model
from pipeline.weights import read_state_dict, save_weights, weights_sha256
from tests.data_helpers import jpeg_bytes
from tests.dist_helpers import run_distributed

SIZE = 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory, synthetic_split) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    split = synthetic_split(split="test", classes=8, per_class=5, samples_per_shard=12, size=SIZE)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", embedding_dim=16))
    weights = save_weights(model.state_dict(), model.architecture, root / "model.safetensors")
    return {"root": root, "split": split, "weights": weights}


def _data_cfg(urls: Path) -> DataConfig:
    return DataConfig(eval_urls=str(urls), image_size=SIZE, resize_size=SIZE, num_workers=0)


def _embed_directly(weights: Path, split: Path) -> dict[int, np.ndarray]:
    """Reference embeddings: every shard read with tarfile, one forward per image."""
    from pipeline.data.transforms import eval_transform

    model = load_trained_model(weights).eval()
    transform = eval_transform(_data_cfg(split))
    out = {}
    for shard in sorted(split.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                index = json.loads(members[name[:-4] + ".json"])["index"]
                image = transform(Image.open(io.BytesIO(data)).convert("RGB"))
                with torch.no_grad():
                    out[index] = model(image[None]).numpy()[0]
    return out


@pytest.mark.slow  # end to end: the real CLI and an MLflow run
def test_cli_writes_embeddings_metrics_figure_and_mlflow_run(assets, tmp_path):
    from mlflow import MlflowClient

    from pipeline.cli import main
    from pipeline.eval.metrics import retrieval_metrics

    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        [
            "evaluate",
            "--weights",
            str(assets["weights"]),
            f"data.eval_urls={assets['split']}",
            f"data.image_size={SIZE}",
            f"data.resize_size={SIZE}",
            "data.num_workers=0",
            "eval.ks=[1,2,4]",
            f"eval.output_dir={out}",
            f"tracking.uri={uri}",
        ]
    )
    assert code == 0
    emb, labels, index = (np.load(out / f"{n}.npy") for n in ("embeddings", "labels", "index"))
    np.testing.assert_array_equal(index, np.arange(40))  # every sample once, in index order
    want = _embed_directly(assets["weights"], assets["split"])
    np.testing.assert_allclose(emb, np.stack([want[i] for i in range(40)]), atol=1e-5)
    import pyarrow.parquet as pq

    np.testing.assert_array_equal(labels, pq.read_table(assets["split"] / "index.parquet")["label"])
    metrics = json.loads((out / "metrics.json").read_text())
    measured = metrics.pop("weights")  # the weights these numbers are of
    assert measured["path"] == str(assets["weights"])
    assert measured["weights_sha256"] == weights_sha256(read_state_dict(assets["weights"])[0])
    assert metrics == retrieval_metrics(emb, labels, [1, 2, 4])
    assert Image.open(out / "retrieval_grid.png").size[0] > 100

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(client.get_experiment_by_name("smoothap").experiment_id)
    # The same names as training-time evaluation (pipeline.train.trainer): eval/<metric>.
    assert run.data.metrics["eval/recall_at_1"] == pytest.approx(metrics["recall@1"])
    assert run.data.metrics["eval/map_at_r"] == pytest.approx(metrics["map@r"])
    assert all(k.startswith("eval/") for k in run.data.metrics)
    assert run.info.status == "FINISHED"
    assert run.data.params["checkpoint"] == str(assets["weights"])
    files = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
    assert files == {"eval/metrics.json", "eval/retrieval_grid.png"}


def _two_rank_eval(rank: int, world_size: int, weights: str, split: str, out: str) -> None:
    model = load_trained_model(weights)
    metrics = evaluate_model(
        model,
        _data_cfg(Path(split)),
        EvalConfig(ks=[1, 2, 4], batch_size=7),
        device="cpu",
        output_dir=out,
        progress=False,
    )
    Path(out, f"metrics{rank}.json").write_text(json.dumps(metrics))


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(assets, tmp_path):
    run_distributed(_two_rank_eval, 2, str(assets["weights"]), str(assets["split"]), str(tmp_path))
    one = tmp_path / "one"
    want = evaluate_model(
        load_trained_model(assets["weights"]),
        _data_cfg(assets["split"]),
        EvalConfig(ks=[1, 2, 4], batch_size=5),
        device="cpu",
        output_dir=one,
        progress=False,
    )
    for rank in range(2):
        got = json.loads((tmp_path / f"metrics{rank}.json").read_text())
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-9), k
    for name in ("index", "labels"):
        np.testing.assert_array_equal(
            np.load(tmp_path / f"{name}.npy"), np.load(one / f"{name}.npy")
        )
    np.testing.assert_allclose(
        np.load(tmp_path / "embeddings.npy"), np.load(one / "embeddings.npy"), atol=1e-5
    )


def _tiny_ijbc(root: Path) -> Path:
    """An IJB-C layout: 4 subjects, 12 templates of 2 media x 2 images, pairs and 1:N lists."""
    meta, crops = root / "IJBC" / "meta", root / "IJBC" / "loose_crop"
    meta.mkdir(parents=True)
    crops.mkdir(parents=True)
    lines, subject = [], {}
    for t in range(12):
        subject[100 + t] = t % 4
        for m in range(2):
            for i in range(2):
                name = f"{t}_{m}_{i}.jpg"
                (crops / name).write_bytes(jpeg_bytes(SIZE, SIZE, seed=t * 10 + m * 3 + i))
                lines.append(f"{name} {100 + t} {1000 + 10 * t + m}")
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(lines) + "\n")
    pairs = [(a, b, int(subject[a] == subject[b])) for a in subject for b in subject if a < b]
    (meta / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {c}\n" for a, b, c in pairs)
    )
    head = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    (meta / "ijbc_1N_gallery_G1.csv").write_text(head + "100,0,a.jpg\n101,1,b.jpg\n")
    (meta / "ijbc_1N_gallery_G2.csv").write_text(head + "102,2,c.jpg\n103,3,d.jpg\n")
    probes = "".join(f"{t},{subject[t]},x.jpg\n" for t in range(104, 112))
    (meta / "ijbc_1N_probe_mixed.csv").write_text(head + probes)
    return root


def test_ijbc_protocol_reads_template_ids_from_the_index(assets, tmp_path):
    from pipeline.data.converters import list_ijbc
    from pipeline.data.writer import write_split
    from pipeline.eval.ijbc import IJBSettings, ijbc_metrics, image_features, load_protocol

    raw = _tiny_ijbc(tmp_path / "raw")
    items, extra = list_ijbc(raw, "test")
    write_split(
        items,
        tmp_path / "shards",
        name="ijbc",
        split="test",
        samples_per_shard=10,
        extra_files=extra,
        progress=False,
    )
    split = tmp_path / "shards" / "test"
    out = tmp_path / "out"
    metrics = evaluate_model(
        load_trained_model(assets["weights"]),
        _data_cfg(split),
        EvalConfig(protocol="ijbc"),
        device="cpu",
        output_dir=out,
        progress=False,
    )
    # Reference: template / media ids straight from the layout's tid_mid file, by image name.
    import pyarrow.parquet as pq

    sources = pq.read_table(split / "index.parquet")["source"].to_pylist()
    tid_mid = {}
    for line in (raw / "IJBC" / "meta" / "ijbc_face_tid_mid.txt").read_text().split("\n")[:-1]:
        name, t, m = line.split()
        tid_mid[f"loose_crop/{name}"] = (int(t), int(m))
    index = np.load(out / "index.npy")
    t_ids, m_ids = zip(*(tid_mid[sources[i]] for i in index))
    # The split has no det_score column: insightface's default settings without it (N1D0F2).
    feats = image_features(
        np.load(out / "embeddings.npy"),
        IJBSettings(det_score=False),
        np.load(out / "embeddings_flip.npy"),
    )
    want, _ = ijbc_metrics(
        feats,
        np.array(t_ids),
        np.array(m_ids),
        load_protocol(raw / "IJBC" / "meta"),
        prefix="ijbc_N1D0F2",
    )
    assert metrics == want
    assert metrics["ijbc_N1D0F2_num_templates"] == 12 and "ijbc_N1D0F2_1n_rank1" in metrics
    assert (out / "roc.png").is_file()


def test_weights_are_required_once_and_must_exist(tmp_path, capsys):
    with pytest.raises(ConfigError, match="pass the trained weights once, as --weights PATH"):
        split_weights(None, ["eval.ks=[1]"])
    with pytest.raises(ConfigError, match="once, as --weights PATH"):
        split_weights("a", ["checkpoint=b"])
    with pytest.raises(ConfigError, match=r"--weights '/nope/model.safetensors' does not exist"):
        split_weights("/nope/model.safetensors", [])
    (tmp_path / "w").write_text("")
    assert split_weights(str(tmp_path / "w"), ["eval.ks=[1]"]) == (
        str(tmp_path / "w"),
        ["eval.ks=[1]"],
    )
    assert capsys.readouterr().err.count("deprecated") == 1  # only the old spelling above


def test_the_old_checkpoint_spelling_still_names_the_weights(tmp_path, capsys):
    """Scripts that pass checkpoint=PATH keep working; stderr names the new spelling."""
    (tmp_path / "w").write_text("")
    assert split_weights(None, [f"checkpoint={tmp_path / 'w'}", "eval.ks=[1]"]) == (
        str(tmp_path / "w"),
        ["eval.ks=[1]"],
    )
    assert "checkpoint=PATH names the weights as --weights PATH now" in capsys.readouterr().err


def test_a_config_naming_another_model_is_refused(assets, capsys):
    from pipeline.cli import main

    # The CLI shows a bad-input error as one line (exit 2) instead of a traceback.
    code = main(
        [
            "evaluate",
            "--weights",
            str(assets["weights"]),
            "model.backbone=resnet18",
            "model.embedding_dim=32",
            "tracking.enabled=false",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "pipeline evaluate: error:" in err and "embedding_dim=16" in err


def test_shards_listed_twice_are_refused(assets, tmp_path):
    from pipeline.eval.extract import extract_embeddings

    shards = sorted(str(p) for p in assets["split"].glob("*.tar"))
    listing = tmp_path / "twice.txt"
    listing.write_text("\n".join([*shards, shards[0]]) + "\n")
    model = load_trained_model(assets["weights"])
    first = json.loads((assets["split"] / "sizes.json").read_text())[Path(shards[0]).name]
    with pytest.raises(ValueError, match=rf"catalog row 0 \(and {first - 1} more\) was read twice"):
        extract_embeddings(
            model, str(listing), _data_cfg(listing), device="cpu", batch_size=8, progress=False
        )
