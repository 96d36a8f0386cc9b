"""insightface's IJB-C test settings (flip, norm score, detector score) end to end: a synthetic
IJB-C release -> make-shards' converter -> shards -> the evaluator, every setting against a
float64 reference written here from the release's own files, the flip features against the
model run on mirrored images, and IJB-B's lists and names."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.cli import main as cli_main
from pipeline.config.schema import DataConfig
from pipeline.config.schema_services import EvalConfig, TrackingConfig
from pipeline.config.schema_train import ModelConfig
from pipeline.data.converters import list_ijbc
from pipeline.data.transforms import eval_transform
from pipeline.data.writer import write_split
from pipeline.eval import protocols
from pipeline.eval.evaluator import evaluate_model
from pipeline.eval.extract import Embeddings
from pipeline.eval.ijbc import FARS, FPIRS, RANKS, identification, load_protocol
from pipeline.model import build_model, load_trained_model
from pipeline.weights import save_weights
from tests.data_helpers.layouts import ijb_release, with_det_scores
from tests.dist_helpers import run_distributed
from tests.test_ijbc import _identification_reference
from tests.test_ijbc_far import brute_nearest, brute_strict

SIZE = 32


def _write_shards(raw: Path, out: Path, release: dict | None) -> Path:
    items, extra = list_ijbc(raw, "test")
    if release is not None:
        items = with_det_scores(items, release)
    else:  # a split written before the converter read the detector scores
        for item in items:
            item.meta.pop("det_score", None)
    write_split(
        items,
        out,
        name="ijbc",
        split="test",
        samples_per_shard=25,
        extra_files=extra,
        progress=False,
    )
    return out / "test"


def _data_cfg(split: Path) -> DataConfig:
    return DataConfig(eval_urls=str(split), image_size=SIZE, resize_size=SIZE, num_workers=0)


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory) -> dict:
    """The release, its shards (with and without det_score), a model and one evaluation with
    insightface's default settings (N1D1F2) logged to a real MLflow store."""
    from pipeline.tracking.session import tracking_session

    root = tmp_path_factory.mktemp("ijbc")
    release = ijb_release(root / "raw", size=SIZE)
    split = _write_shards(root / "raw", root / "shards", release)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", embedding_dim=16)).eval()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_session(TrackingConfig(uri=uri), is_main=True) as tracker:
        metrics = evaluate_model(
            model,
            _data_cfg(split),
            EvalConfig(protocol="ijbc"),
            device="cpu",
            output_dir=root / "out",
            tracker=tracker,
            progress=False,
        )
        run_id = tracker.run_id
    return {
        "root": root,
        "release": release,
        "split": split,
        "model": model,
        "metrics": metrics,
        "out": root / "out",
        "uri": uri,
        "run_id": run_id,
    }


def _embeddings(out: Path) -> Embeddings:
    """The evaluation's files: what anyone can recompute the figures from."""
    return Embeddings(
        np.load(out / "embeddings.npy"),
        np.load(out / "labels.npy"),
        np.load(out / "index.npy"),
        np.load(out / "embeddings_flip.npy"),
    )


def _names_of_rows(split: Path, index: np.ndarray) -> list[str]:
    import pyarrow.parquet as pq

    sources = pq.read_table(split / "index.parquet")["source"].to_pylist()
    return [sources[i].split("/", 1)[1] for i in index]


def reference(release: dict, feats: dict, flips: dict, flip: bool, norm: bool, det: bool) -> dict:
    """Every figure in float64 loops, from the release's truth and per-image features."""
    x = {}
    for name, (_, _, score) in release["images"].items():
        f = np.asarray(feats[name], np.float64)
        if flip:
            f = f + np.asarray(flips[name], np.float64)
        if not norm:
            f = f / np.sqrt(sum(v * v for v in f))
        x[name] = f * score if det else f
    templates = {}
    for t in sorted(release["subject"]):
        media = {}
        for name, (tt, m, _) in release["images"].items():
            if tt == t:
                media.setdefault(m, []).append(x[name])
        summed = sum(sum(fs) / len(fs) for fs in media.values())
        templates[t] = summed / np.sqrt(sum(v * v for v in summed))
    scores = np.array([templates[a] @ templates[b] for a, b, _ in release["pairs"]])
    labels = np.array([c for _, _, c in release["pairs"]], bool)
    out = {f"tar@far={f:g}": brute_strict(scores, labels, f) for f in FARS}
    out.update({f"tar_nearest@far={f:g}": brute_nearest(scores, labels, f) for f in FARS})
    probes = release["probes"]
    q = np.stack([templates[t] for t in probes])
    q_subj = np.array([release["subject"][t] for t in probes])
    per_gallery = []
    for g, members in release["galleries"].items():
        gal = np.stack([templates[t] for t in members])
        g_subj = np.array([release["subject"][t] for t in members])
        r = _identification_reference(q, q_subj, gal, g_subj, RANKS, FPIRS)
        out.update({f"1n_{g}_{k}": v for k, v in r.items()})
        per_gallery.append(r)
    for k in per_gallery[0]:
        out[f"1n_{k}"] = float(np.mean([r[k] for r in per_gallery]))
    out["num_templates"] = float(len(templates))
    out["num_pairs"] = float(len(scores))
    return out


def _features_by_name(ijbc: dict) -> tuple[Embeddings, dict, dict]:
    e = _embeddings(ijbc["out"])
    names = _names_of_rows(ijbc["split"], e.row_N)
    return e, dict(zip(names, e.emb_ND)), dict(zip(names, e.flip_ND))


def test_every_setting_matches_a_float64_reference(ijbc):
    """All 8 settings, computed by the registry's IJB-C entry from the written features."""
    e, feats, flips = _features_by_name(ijbc)
    data_cfg = _data_cfg(ijbc["split"])
    for flip, norm, det in itertools.product((True, False), repeat=3):
        ev = EvalConfig(protocol="ijbc", ijbc_flip=flip, ijbc_norm_score=norm, ijbc_det_score=det)
        result = protocols.get("ijbc").compute(e, data_cfg, ev, "cpu")
        mode = f"N{int(norm)}D{int(det)}F{2 if flip else 0}"
        want = reference(ijbc["release"], feats, flips, flip, norm, det)
        assert result.metrics.keys() == {f"ijbc_{mode}_{k}" for k in want}, mode
        for k, v in want.items():
            assert result.metrics[f"ijbc_{mode}_{k}"] == pytest.approx(v, abs=1e-12), (mode, k)
        settings = result.record[f"ijbc_{mode}_settings"]
        assert (settings["flip"], settings["norm_score"], settings["det_score"]) == (
            flip,
            norm,
            det,
        )
    # The settings change the figures (the comparison above is not between constants).
    n0 = reference(ijbc["release"], feats, flips, True, False, True)
    n1 = reference(ijbc["release"], feats, flips, True, True, False)
    assert n0 != n1


def test_the_evaluation_writes_what_it_pooled_and_names_its_settings(ijbc):
    from mlflow import MlflowClient

    metrics, out = ijbc["metrics"], ijbc["out"]
    assert all(k.startswith("ijbc_N1D1F2_") for k in metrics)  # insightface's default
    e, feats, flips = _features_by_name(ijbc)
    want = reference(ijbc["release"], feats, flips, True, True, True)
    for k, v in want.items():
        assert metrics[f"ijbc_N1D1F2_{k}"] == pytest.approx(v, abs=1e-12), k
    names = _names_of_rows(ijbc["split"], e.row_N)
    det = np.load(out / "det_score.npy")
    np.testing.assert_allclose(det, [ijbc["release"]["images"][n][2] for n in names], rtol=1e-6)
    record = json.loads((out / "metrics.json").read_text())
    settings = record["ijbc_N1D1F2_settings"]
    assert settings["det_score_source"] == "catalog column det_score"
    assert settings["features"] == {
        "original": "embeddings.npy",
        "mirrored": "embeddings_flip.npy",
        "rows": "index.npy",
        "det_score": "det_score.npy",
    }
    run = MlflowClient(tracking_uri=ijbc["uri"]).get_run(ijbc["run_id"])
    assert run.data.metrics["eval/ijbc_N1D1F2_tar_nearest_at_far_0.0001"] == pytest.approx(
        metrics["ijbc_N1D1F2_tar_nearest@far=0.0001"]
    )
    assert run.data.tags["eval.ijbc.mode"] == "N1D1F2"
    assert run.data.tags["eval.ijbc.det_score_source"] == "catalog column det_score"


def test_flip_features_are_the_model_on_the_mirrored_image(ijbc):
    """Every written row against the model on the images read back from the shards with
    tarfile: the original and its horizontal mirror (PIL), before the model's L2
    normalisation (one batch each; BatchNorm in eval mode treats images independently)."""
    model, split = ijbc["model"], ijbc["split"]
    e = _embeddings(ijbc["out"])
    row_of = {int(i): r for r, i in enumerate(e.row_N)}
    transform = eval_transform(_data_cfg(split))
    rows, own, mirrored = [], [], []
    for shard in sorted(split.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                rows.append(row_of[json.loads(members[name[:-4] + ".json"])["index"]])
                image = Image.open(io.BytesIO(data)).convert("RGB")
                own.append(transform(image))
                mirrored.append(transform(ImageOps.mirror(image)))
    assert sorted(rows) == list(range(len(e.row_N)))
    assert len(rows) == len(ijbc["release"]["images"])
    with torch.no_grad():
        want = model.embed_unnormalized(torch.stack(own)).numpy()
        want_flip = model.embed_unnormalized(torch.stack(mirrored)).numpy()
    np.testing.assert_allclose(e.emb_ND[rows], want, atol=1e-4)
    np.testing.assert_allclose(e.flip_ND[rows], want_flip, atol=1e-4)
    # The mirror's feature is another feature, and the features are not normalised.
    assert np.abs(e.flip_ND - e.emb_ND).max() > 1e-2
    assert not np.allclose(np.linalg.norm(e.emb_ND, axis=1), 1.0)


def _two_rank_ijbc(rank: int, world_size: int, weights: str, split: str, out: str) -> None:
    metrics = evaluate_model(
        load_trained_model(weights),
        _data_cfg(Path(split)),
        EvalConfig(protocol="ijbc", batch_size=7),
        device="cpu",
        output_dir=out,
        progress=False,
    )
    Path(out, f"metrics{rank}.json").write_text(json.dumps(metrics))


@pytest.mark.distributed
def test_two_ranks_gather_the_mirrored_features_and_agree_with_one(ijbc, tmp_path):
    """Each rank embeds its part (and its mirrors); rank 0 scores; every rank returns the same
    figures as the one-process evaluation."""
    model = ijbc["model"]
    weights = save_weights(model.state_dict(), model.architecture, tmp_path / "w.safetensors")
    run_distributed(_two_rank_ijbc, 2, str(weights), str(ijbc["split"]), str(tmp_path))
    for rank in range(2):
        got = json.loads((tmp_path / f"metrics{rank}.json").read_text())
        assert got == pytest.approx(ijbc["metrics"], abs=1e-9)
    one, two = _embeddings(ijbc["out"]), _embeddings(tmp_path)
    np.testing.assert_array_equal(two.row_N, one.row_N)
    np.testing.assert_allclose(two.emb_ND, one.emb_ND, atol=1e-5)
    np.testing.assert_allclose(two.flip_ND, one.flip_ND, atol=1e-5)


def test_parts_carry_the_mirrored_features_and_merge_to_the_same_figures(ijbc, tmp_path):
    """Evaluation in parts (array jobs): each part file holds its rows' mirrors, a part made
    with another extraction is never reused, and the merge scores as one evaluation."""
    from pipeline.config.runconfig import RunConfig
    from pipeline.eval.parts import extract_part, fingerprint, merge_and_score, plan_parts

    model = ijbc["model"]
    weights = str(save_weights(model.state_dict(), model.architecture, tmp_path / "w.safetensors"))
    cfg = RunConfig(
        data=_data_cfg(ijbc["split"]),
        eval=EvalConfig(protocol="ijbc", output_dir=str(tmp_path / "eval")),
        model=ModelConfig(backbone="resnet18", embedding_dim=16),
        tracking=TrackingConfig(enabled=False),
    )
    plan = plan_parts(cfg.data.eval_urls, 2)
    assert len(plan) == 2
    for i, urls in enumerate(plan):
        extract_part(cfg, weights, i, urls)
    plain = fingerprint(weights, plan[0])
    assert fingerprint(weights, plan[0], protocols.get("ijbc").extraction(cfg.eval)) != plain
    merged = merge_and_score(cfg, weights, plan)
    assert merged["metrics"] == pytest.approx(ijbc["metrics"], abs=1e-9)
    np.testing.assert_allclose(
        np.load(tmp_path / "eval" / "embeddings_flip.npy"),
        _embeddings(ijbc["out"]).flip_ND,
        atol=1e-5,
    )


def test_a_split_without_detector_scores_is_weighted_1_and_says_so(ijbc, tmp_path):
    split = _write_shards(ijbc["root"] / "raw", tmp_path / "shards", release=None)
    e, feats, flips = _features_by_name(ijbc)
    result = protocols.get("ijbc").compute(e, _data_cfg(split), EvalConfig(protocol="ijbc"), "cpu")
    want = reference(ijbc["release"], feats, flips, True, True, False)
    assert result.metrics == {
        f"ijbc_N1D0F2_{k}": pytest.approx(v, abs=1e-12) for k, v in want.items()
    }
    settings = result.record["ijbc_N1D0F2_settings"]
    assert settings["asked"]["det_score"] is True and settings["det_score"] is False
    assert settings["det_score_source"].startswith("none: index.parquet has no det_score column")
    assert result.tags["eval.ijbc.mode"] == "N1D0F2"


def test_flip_off_extracts_no_mirror_and_matches_the_reference(ijbc, tmp_path):
    metrics = evaluate_model(
        ijbc["model"],
        _data_cfg(ijbc["split"]),
        EvalConfig(protocol="ijbc", ijbc_flip=False, ijbc_norm_score=False),
        device="cpu",
        output_dir=tmp_path,
        progress=False,
    )
    assert not (tmp_path / "embeddings_flip.npy").exists()
    _, feats, flips = _features_by_name(ijbc)
    want = reference(ijbc["release"], feats, flips, False, False, True)
    for k, v in want.items():
        assert metrics[f"ijbc_N0D1F0_{k}"] == pytest.approx(v, abs=1e-12), k


def test_ijbb_lists_read_like_ijbc_and_name_their_metrics(ijbc, tmp_path):
    """IJB-B's release has the same layout (ijbb_ files, galleries S1 and S2): the same
    synthetic templates under IJB-B's names give the same figures under ijbb_ names."""
    release_b = ijb_release(tmp_path, bench="IJBB", size=SIZE)
    assert release_b["images"] == ijbc["release"]["images"]
    lists = load_protocol(tmp_path / "IJBB" / "meta")
    assert lists.benchmark == "ijbb" and set(lists.galleries) == {"S1", "S2"}
    e = _embeddings(ijbc["out"])
    ev = EvalConfig(protocol="ijbc", ijbc_protocol=str(tmp_path / "IJBB" / "meta"))
    result = protocols.get("ijbc").compute(e, _data_cfg(ijbc["split"]), ev, "cpu")
    renamed = {
        k.replace("ijbb_", "ijbc_").replace("_S1_", "_G1_").replace("_S2_", "_G2_"): v
        for k, v in result.metrics.items()
    }
    assert renamed == ijbc["metrics"]
    assert result.tags["eval.ijbc.benchmark"] == "ijbb"


def test_make_shards_ijbb_writes_a_split_that_evaluates_like_ijbc(ijbc, tmp_path):
    """`pipeline make-shards ijbb` reads IJB-B's release (IJBB/, ijbb_ files, galleries S1 and
    S2, its five landmarks and detector scores) into a split whose own lists are IJB-B's: the
    same synthetic release evaluates to the same figures as the IJB-C split, under ijbb_ names."""
    ijb_release(tmp_path / "raw", bench="IJBB", size=SIZE)
    out = tmp_path / "shards"
    argv = ["make-shards", "ijbb", "--root", str(tmp_path / "raw"), "--out", str(out)]
    argv += ["--crop", "none", "--samples-per-shard", "25", "--name", "ijbc", "--no-progress"]
    assert cli_main(argv) == 0
    split = out / "test"
    assert {p.name for p in split.glob("*.parquet")} == {
        "index.parquet",
        "pairs.parquet",
        "gallery_S1.parquet",
        "gallery_S2.parquet",
        "probe_mixed.parquet",
    }
    lists = load_protocol(split)
    assert lists.benchmark == "ijbb" and set(lists.galleries) == {"S1", "S2"}
    e = _embeddings(ijbc["out"])  # the same images in the same rows as the IJB-C split
    result = protocols.get("ijbc").compute(e, _data_cfg(split), EvalConfig(protocol="ijbc"), "cpu")
    renamed = {
        k.replace("ijbb_", "ijbc_").replace("_S1_", "_G1_").replace("_S2_", "_G2_"): v
        for k, v in result.metrics.items()
    }
    assert renamed == pytest.approx(ijbc["metrics"], abs=1e-12)


def test_insightface_1n_rule_is_strict_at_the_threshold_and_the_top():
    """Hand-made scores: 4 non-mated probes with top scores 0.9, 0.7, 0.5, 0.3 (FPIR 0.5 ->
    position int(4 x 0.5) - 1 = 1 -> threshold 0.7; FPIR 0.1 -> position 0 -> 0.9)."""
    g = np.eye(3, dtype=np.float32)  # gallery templates e0 (subject 0), e1 (1), e2 (2)
    g_subj = np.array([0, 1, 2])

    def probe(a, b):  # score a with e0, b with e1
        return [a, b, 0.0]

    q = np.array(
        [
            probe(0.8, 0.1),  # subject 0: mate 0.8 > threshold 0.7, top -> counts at 0.5
            probe(0.7, 0.1),  # subject 0: mate equals the threshold 0.7 -> never counts
            probe(0.95, 0.95),  # subject 0: tied with a non-mate -> not its top: never counts
            probe(0.2, 0.95),  # subject 1: mate 0.95 above 0.9 and the top -> counts at both
            *[probe(s, 0.0) for s in (0.9, 0.7, 0.5, 0.3)],  # subject 9: non-mated
        ],
        dtype=np.float32,
    )
    q_subj = np.array([0, 0, 0, 1, 9, 9, 9, 9])
    got = identification(q, q_subj, g, g_subj, ranks=(1,), fpirs=(0.1, 0.5))
    assert got["tpir_insightface@fpir=0.5"] == pytest.approx(2 / 4)
    assert got["tpir_insightface@fpir=0.1"] == pytest.approx(1 / 4)
    want = _identification_reference(q, q_subj, g, g_subj, (1,), (0.1, 0.5))
    assert got == pytest.approx(want, abs=1e-12)
