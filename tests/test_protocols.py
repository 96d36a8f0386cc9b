"""The protocol registry: the config rules, preflight and the evaluator reach a protocol only
through it, so a protocol registered here, in the test, is checked, preflighted, extracted,
computed and written without any other file knowing its name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config.rules import load_checked as load_config
from pipeline.config.schema import ConfigError, DataConfig
from pipeline.config.schema_services import EvalConfig
from pipeline.config.schema_train import ModelConfig
from pipeline.eval import protocols
from pipeline.eval.evaluator import evaluate_model
from pipeline.eval.protocols import Extraction, Protocol, Result, preflight
from pipeline.model import build_model
from pipeline.preflight import EvalSplit, PreflightError
from pipeline.weights import weights_sha256
from tests.test_preflight import run_cfg

SIZE = 16


class Calls:
    """A protocol that records how the pipeline called it (and can be told to refuse)."""

    def __init__(self) -> None:
        self.config: list[bool] = []
        self.preflight: list[EvalSplit] = []
        self.computed: list = []
        self.written: list = []
        self.refuse_config = self.refuse_data = False

    def check_config(self, cfg, selected: bool) -> None:
        self.config.append(selected)
        if self.refuse_config and selected:
            raise ConfigError("eval.protocol=dummy: refused by its own rule")

    def check_data(self, cfg, split) -> list[str]:
        self.preflight.append(split)
        if self.refuse_data:
            raise PreflightError(f"data.eval_urls={split.spec!r}: refused by dummy")
        return ["dummy: looked at the catalog"]

    def extraction(self, ev: EvalConfig) -> Extraction:
        return Extraction(flip=True, unnormalized=True)

    def compute(self, e, data_cfg, ev, device) -> Result:
        self.computed.append(e)
        norms = np.linalg.norm(e.emb_ND + e.flip_ND, axis=1)
        return Result({"dummy_mean_norm": float(norms.mean())}, {"dummy_record": {"n": len(norms)}})

    def write(self, out, e, result, data_cfg, ev) -> list:
        self.written.append(out)
        path = out / "dummy.txt"
        path.write_text("written by the dummy protocol\n")
        return [path]

    def protocol(self) -> Protocol:
        return Protocol(
            "dummy", self.check_config, self.check_data, self.extraction, self.compute, self.write
        )


@pytest.fixture
def dummy(monkeypatch) -> Calls:
    calls = Calls()
    monkeypatch.setitem(protocols.REGISTRY, "dummy", calls.protocol())
    return calls


@pytest.fixture(scope="module")
def split(synthetic_split):
    return synthetic_split(split="test", classes=4, per_class=3, samples_per_shard=6, size=SIZE)


def test_the_config_rules_run_every_protocols_check(dummy):
    load_config(None, ["eval.protocol=dummy"])
    load_config(None, ["eval.protocol=retrieval"])
    assert dummy.config == [True, False]  # selected, then consulted as another protocol
    dummy.refuse_config = True
    with pytest.raises(ConfigError, match=r"^eval\.protocol=dummy: refused by its own rule$"):
        load_config(None, ["eval.protocol=dummy"])


def test_an_unknown_protocol_is_a_one_line_error_naming_the_registered_ones(dummy):
    with pytest.raises(
        ConfigError,
        match=r"^eval\.protocol='nope': no such evaluation protocol; use one of retrieval, "
        r"vggface2, ijbc, dummy$",
    ):
        load_config(None, ["eval.protocol=nope"])
    with pytest.raises(ValueError, match="registered twice"):
        protocols.register(dummy.protocol())


def test_preflight_runs_the_selected_protocols_check(dummy, split):
    """What every entry point runs (pipeline.eval.protocols.preflight): the shard checks,
    then the selected protocol's own, with what the shard checks read of the eval split."""
    cfg = run_cfg(split, split, eval=EvalConfig(protocol="dummy"))
    report = preflight(cfg, 1, train=False)
    assert "dummy: looked at the catalog" in report.lines
    (seen,) = dummy.preflight
    assert seen.indexed and "label" in seen.columns
    assert seen.label_counts == dict.fromkeys(range(4), 3)
    dummy.refuse_data = True
    with pytest.raises(PreflightError, match=r"^data\.eval_urls='.*': refused by dummy$"):
        preflight(cfg, 1, train=False)


def test_the_evaluator_extracts_computes_and_writes_through_the_registry(dummy, split, tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", embedding_dim=8))
    data_cfg = DataConfig(eval_urls=str(split), image_size=SIZE, resize_size=SIZE, num_workers=0)
    metrics = evaluate_model(
        model,
        data_cfg,
        EvalConfig(protocol="dummy"),
        device="cpu",
        output_dir=tmp_path,
        progress=False,
    )
    (e,) = dummy.computed
    assert e.flip_ND is not None and e.flip_ND.shape == e.emb_ND.shape  # its extraction
    want = np.linalg.norm(e.emb_ND + e.flip_ND, axis=1).mean()
    assert metrics == {"dummy_mean_norm": pytest.approx(float(want))}
    assert dummy.written == [tmp_path]
    assert (tmp_path / "dummy.txt").is_file()
    record = json.loads((tmp_path / "metrics.json").read_text())
    measured = record.pop("weights")  # a model in memory: the identity of what it holds
    assert measured["weights_sha256"] == weights_sha256(model.state_dict())
    assert record == {"dummy_mean_norm": pytest.approx(float(want)), "dummy_record": {"n": 12}}


def test_vggface2_needs_the_full_ranking_map():
    with pytest.raises(
        ConfigError, match=r"^eval\.protocol=vggface2 with eval\.full_map=false: .*full ranking"
    ):
        load_config(None, ["eval.protocol=vggface2", "eval.full_map=false"])
    load_config(None, ["eval.protocol=retrieval", "eval.full_map=false"])
