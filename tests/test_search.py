"""``pipeline index`` / ``pipeline search`` on tiny synthetic held-out shards and an image folder.

References: the evaluation's own extraction (``extract_embeddings``) and exact kNN
(``pipeline.eval.knn.knn_search``) for the same images; a NumPy brute-force top-k for the
compressed indexes' recall.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config.schema import DataConfig
from pipeline.config.schema_train import ModelConfig
from pipeline.model import build_model, load_trained_model
from pipeline.weights import save_weights
from tests.data_helpers import write_image

SIZE, K = 32, 6
CFG = [f"data.image_size={SIZE}", f"data.resize_size={SIZE}", "data.num_workers=0"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, synthetic_split) -> dict:
    root = tmp_path_factory.mktemp("search")
    split = synthetic_split(split="test", classes=6, per_class=5, samples_per_shard=8, size=SIZE)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", embedding_dim=16))
    weights = save_weights(model.state_dict(), model.architecture, root / "model.safetensors")
    index_dir = root / "gallery"
    argv = [
        "build-gallery",
        "--weights",
        str(weights),
        *CFG,
        "--shards",
        str(split),
        "--out",
        str(index_dir),
    ]
    assert main(argv) == 0
    return {"root": root, "split": split, "weights": weights, "index": index_dir}


def _samples(split: Path) -> dict[int, tuple[bytes, str]]:
    """Every sample's JPEG bytes and class name by catalog row, read with tarfile."""
    out = {}
    for shard in sorted(split.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                out[meta["index"]] = (members[name[:-5] + ".jpg"], meta["class_name"])
    return out


def test_search_returns_the_evaluations_knn(assets, tmp_path, capsys):
    from pipeline.eval.extract import extract_embeddings
    from pipeline.eval.knn import knn_search

    data_cfg = DataConfig(image_size=SIZE, resize_size=SIZE, num_workers=0)
    e = extract_embeddings(
        load_trained_model(assets["weights"]),
        str(assets["split"]),
        data_cfg,
        device="cpu",
        batch_size=7,
        progress=False,
    )
    query_rows = [0, 7, 13, 29]
    want_s, want_i = knn_search(e.emb_ND[query_rows], e.emb_ND, K)

    samples = _samples(assets["split"])
    files = []
    for r in query_rows:
        data, cls = samples[int(e.row_N[r])]
        f = tmp_path / "queries" / cls / f"q{r}.jpg"  # folder named by class: marked in the grid
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        files.append(f)
    out_json, grid = tmp_path / "res.json", tmp_path / "grid.png"
    argv = ["search", str(assets["index"]), *map(str, files), "--k", str(K)]
    assert main([*argv, "--json", str(out_json), "--grid", str(grid)]) == 0
    res = json.loads(out_json.read_text())
    import pyarrow.parquet as pq

    items = pq.read_table(assets["index"] / "items.parquet").to_pydict()
    index_table = pq.read_table(assets["split"] / "index.parquet").to_pydict()
    for q, r in enumerate(res):
        got_rows = [h["row"] for h in r["neighbours"]]
        # gallery rows are the extraction's rows (global-index order)
        np.testing.assert_array_equal(got_rows, want_i[q])
        np.testing.assert_allclose([h["score"] for h in r["neighbours"]], want_s[q], atol=1e-5)
        for h in r["neighbours"]:
            g = int(e.row_N[h["row"]])
            assert h["key"] == index_table["key"][g] == items["key"][h["row"]]
            assert h["class_name"] == index_table["class_name"][g]
        assert r["neighbours"][0]["class_name"] == r["class_name"]  # itself, in its class
    printed = capsys.readouterr().out
    assert f"query {files[0]}" in printed and res[0]["neighbours"][1]["key"] in printed
    from PIL import Image

    assert Image.open(grid).size[0] > 300


def test_query_that_is_not_an_image_is_a_one_line_error(assets, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    assert main(["search", str(assets["index"]), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "not a readable image" in err


def test_index_directory_is_not_overwritten(assets, capsys):
    argv = [
        "build-gallery",
        "--weights",
        str(assets["weights"]),
        *CFG,
        "--shards",
        str(assets["split"]),
    ]
    assert main([*argv, "--out", str(assets["index"])]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_image_folder_gallery_skips_bad_files_and_finds_itself(assets, tmp_path, capsys):
    folder = tmp_path / "photos"
    for c in ("cats", "dogs"):
        for i in range(3):
            write_image(folder / c / f"{i}.jpg", 40 + i, 30, seed=hash(c) % 100 + i)
    (folder / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "gallery"
    argv = [
        "index",  # the old name of build-gallery
        "--weights",
        str(assets["weights"]),
        *CFG,
        "--images",
        str(folder),
        "--out",
        str(out),
        "--max-skipped-fraction",  # 1 of 7: above the default limit, which make-shards shares
        "0.2",
    ]
    assert main(argv) == 0  # the old command name still works, with a message
    captured = capsys.readouterr()
    assert "skipped 1 unreadable images" in captured.out
    assert "`pipeline index` is now `pipeline build-gallery`" in captured.err
    assert "broken.jpg" in (out / "skipped.txt").read_text()
    query = folder / "dogs" / "1.jpg"
    res = tmp_path / "res.json"
    assert main(["search", str(out), str(query), "--k", "3", "--json", str(res)]) == 0
    top = json.loads(res.read_text())[0]["neighbours"][0]
    assert top["source"] == str(query.resolve()) and top["class_name"] == "dogs"
    assert top["score"] == pytest.approx(1.0, abs=1e-5)


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 20, dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, dim)).astype(
        np.float32
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_compressed_index_recall_against_brute_force(kind):
    from pipeline.serve.gallery_index import IndexParams, build_index, measure_recall, search_index

    emb = _clustered(4000, 64)
    index, params = build_index(emb, IndexParams(kind=kind, nprobe=16))
    recall = measure_recall(index, emb, k=10, queries=200)
    # independent recall: NumPy brute force on the same 200 queries
    rows = np.sort(np.random.default_rng(0).permutation(len(emb))[:200])
    exact = np.argsort(-(emb[rows] @ emb.T), axis=1, kind="stable")[:, :10]
    _, approx = search_index(index, emb[rows], 10)
    want = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    assert recall == pytest.approx(want, abs=0.01)  # ties at the 10th place may differ
    assert recall > (0.9 if kind == "hnsw" else 0.5)
    if kind == "ivfpq":
        assert params.nlist == round(np.sqrt(4000)) and params.pq_m == 8


def test_small_gallery_refuses_ivfpq():
    from pipeline.serve.gallery_index import GalleryError, IndexParams, build_index

    with pytest.raises(GalleryError, match="ivfpq needs at least 256 gallery items"):
        build_index(_clustered(100, 16), IndexParams(kind="ivfpq"))
