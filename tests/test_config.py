import subprocess
import sys

import pytest

from pipeline.config.load import DEFAULTS_PATH, flatten, load_config, save_config
from pipeline.config.runconfig import RunConfig, to_dict
from pipeline.config.schema import ConfigError


def test_defaults_file_is_the_dataclass_defaults():
    # conf/defaults.yaml is generated from the dataclasses; regenerate it with
    # `python -m pipeline.config > conf/defaults.yaml` when a default changes.
    assert load_config() == RunConfig()
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.config"], capture_output=True, text=True, check=True
    ).stdout
    assert out == DEFAULTS_PATH.read_text()


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("loss:\n  temperature: 0.05\nsampler:\n  classes_per_batch: 8\n")
    cfg = load_config(f, ["loss.temperature=0.2", "eval.ks=[1,10]", "train.output_dir=/x"])
    assert cfg.loss.temperature == 0.2
    assert cfg.sampler.classes_per_batch == 8
    assert cfg.eval.ks == [1, 10]
    assert cfg.train.output_dir == "/x"
    assert cfg.optim.lr == RunConfig().optim.lr


def test_int_and_exponent_strings_are_accepted_for_float(tmp_path):
    assert load_config(None, ["loss.temperature=1"]).loss.temperature == 1.0
    # YAML 1.1 parses 3e-3 (no dot) as a string.
    assert load_config(None, ["optim.lr=3e-3"]).optim.lr == 0.003
    f = tmp_path / "exp.yaml"
    f.write_text("optim:\n  lr: 1e-5\n")
    assert load_config(f).optim.lr == 1e-5
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got str 'fast'"):
        load_config(None, ["optim.lr=fast"])


def test_unknown_key_in_override_lists_valid_keys():
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'loss\.temp'.*valid keys of loss: temperature, query_in_positives",
    ):
        load_config(None, ["loss.temp=0.1"])
    with pytest.raises(
        ConfigError, match=r"unknown config key 'los'.*valid keys: data, sampler, model"
    ):
        load_config(None, ["los.temperature=0.1"])


def test_unknown_key_in_file_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(
        ConfigError,
        match=r"bad\.yaml: unknown config key 'optim\.learning_rate'; valid keys of optim: name, lr",
    ):
        load_config(f)


def test_wrong_type_names_key():
    with pytest.raises(
        ConfigError, match=r"sampler\.classes_per_batch: expected int, got str 'many'"
    ):
        load_config(None, ["sampler.classes_per_batch=many"])
    with pytest.raises(ConfigError, match=r"loss\.query_in_positives: expected bool, got int"):
        load_config(None, ["loss.query_in_positives=1"])
    with pytest.raises(ConfigError, match=r"eval\.ks\[1\]: expected int"):
        load_config(None, ["eval.ks=[1,x]"])


def test_rule_violation_names_field_value_and_rule():
    with pytest.raises(ConfigError, match=r"loss\.temperature=-1\.0: must be > 0"):
        load_config(None, ["loss.temperature=-1"])
    with pytest.raises(
        ConfigError, match=r"gradient_accumulation_steps=4: must be 1.*train\.chunk_size"
    ):
        load_config(None, ["train.gradient_accumulation_steps=4"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["loss.temperature"])
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["loss.temperature=0.3", "eval.ks=[2,3]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_flatten():
    flat = flatten(to_dict(RunConfig()))
    assert flat["loss.temperature"] == 0.01
    assert "data.train.0.urls" in flat
