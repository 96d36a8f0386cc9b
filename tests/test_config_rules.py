"""Cross-section config rules (pipeline.config.rules): one-line errors before anything runs."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.config.load import load_config
from pipeline.config.rules import load_checked
from pipeline.config.schema import ConfigError


def load(*overrides: str):
    return load_checked(None, list(overrides))


def test_defaults_and_shipped_experiments_pass_the_rules():
    load()
    for name in ("demo", "experiments/sop", "experiments/inat", "experiments/vggface2"):
        load_checked(f"conf/{name}.yaml")


def test_streams_must_be_a_multiple_of_workers():
    with pytest.raises(
        ConfigError,
        match=r"^sampler\.streams_per_rank=3 is not a multiple of data\.num_workers=2: .*"
        r"set sampler\.streams_per_rank to a multiple of 2",
    ):
        load("data.num_workers=2", "sampler.streams_per_rank=3")
    load("data.num_workers=2", "sampler.streams_per_rank=4")
    load("data.num_workers=0", "sampler.streams_per_rank=3")


def test_chunk_size_leaving_a_one_image_chunk_needs_frozen_batchnorm():
    # 16 x 4 = 64 images; 64 = 7 x 9 + 1.
    common = ("sampler.classes_per_batch=16", "sampler.samples_per_class=4")
    with pytest.raises(
        ConfigError,
        match=r"^train\.chunk_size=9 cuts the per-GPU batch of 64 images .* the last holds 1 "
        r"image.*BatchNorm.*\(e\.g\. train\.chunk_size=10\) or set model\.freeze_bn=true",
    ):
        load(*common, "train.chunk_size=9", "model.freeze_bn=false")
    with pytest.raises(ConfigError, match=r"train\.chunk_size=1 .* every one holds 1 image"):
        load(*common, "train.chunk_size=1", "model.freeze_bn=false")
    load(*common, "train.chunk_size=9", "model.freeze_bn=true")  # frozen BN: no batch statistics
    load(*common, "train.chunk_size=10", "model.freeze_bn=false")
    load(*common, "train.chunk_size=64", "model.freeze_bn=false")  # one chunk: cache off


def test_deepspeed_file_must_exist():
    with pytest.raises(
        ConfigError,
        match=r"^train\.deepspeed_config='conf/deepspeed/zero3\.yaml': the file does not exist "
        r".*shipped: conf/deepspeed/bf16\.yaml, .*conf/deepspeed/zero2\.yaml\)",
    ):
        load("train.deepspeed_config=conf/deepspeed/zero3.yaml")


def test_zero_stage_must_match_the_deepspeed_file():
    with pytest.raises(
        ConfigError,
        match=r"zero2\.yaml' sets zero_optimization\.stage=2 but train\.zero_stage=1: they must "
        r"agree; set train\.zero_stage=2 or use conf/deepspeed/zero1\.yaml",
    ):
        load("train.zero_stage=1", "train.deepspeed_config=conf/deepspeed/zero2.yaml")
    load("train.zero_stage=2", "train.deepspeed_config=conf/deepspeed/zero2.yaml")


def test_gradient_accumulation_is_refused_in_the_deepspeed_file_too(tmp_path):
    ds = tmp_path / "ds.yaml"
    ds.write_text("gradient_accumulation_steps: 4\n")
    with pytest.raises(
        ConfigError,
        match=r"ds\.yaml' sets gradient_accumulation_steps=4: refused, Smooth-AP ranks every "
        r"query against the whole batch.*set train\.chunk_size",
    ):
        load(f"train.deepspeed_config={ds}")
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2: must be 1"):
        load("train.gradient_accumulation_steps=2")


def test_deepspeed_file_may_not_set_what_the_config_derives(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_batch_size": 512}')
    with pytest.raises(
        ConfigError,
        match=r"sets 'train_batch_size', which the pipeline derives from sampler\.classes_per_batch",
    ):
        load(f"train.deepspeed_config={ds}")
    ds.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"must hold a mapping of DeepSpeed settings"):
        load(f"train.deepspeed_config={ds}")


def test_autocast_settings_need_bf16():
    with pytest.raises(
        ConfigError,
        match=r"sets torch_autocast, but train\.precision='fp32'.*train\.precision=bf16",
    ):
        load("train.precision=fp32", "train.deepspeed_config=conf/deepspeed/bf16.yaml")
    load("train.precision=bf16", "train.deepspeed_config=conf/deepspeed/bf16.yaml")


def test_ijbc_protocol_folder_needs_the_ijbc_protocol():
    with pytest.raises(
        ConfigError,
        match=r"^eval\.ijbc_protocol='meta' is set but eval\.protocol='retrieval' never reads "
        r"it; set eval\.protocol=ijbc or eval\.ijbc_protocol=''",
    ):
        load("eval.ijbc_protocol=meta")
    load("eval.ijbc_protocol=meta", "eval.protocol=ijbc")


def test_ijbc_on_remote_shards_needs_a_local_protocol_folder():
    remote = "data.eval_urls=pipe:cat /x/ijbc-test-{000000..000003}.tar"
    with pytest.raises(
        ConfigError,
        match=r"eval\.protocol=ijbc with remote data\.eval_urls=.*eval\.ijbc_protocol=DIR",
    ):
        load(remote, "eval.protocol=ijbc")
    load(remote, "eval.protocol=ijbc", "eval.ijbc_protocol=/local/ijbc")


def test_one_gpu_per_task():
    with pytest.raises(
        ConfigError,
        match=r"^launch\.tasks_per_node=4 with launch\.gpus_per_node=2: every task \(rank\) needs "
        r"a GPU of its own; set launch\.tasks_per_node<=2",
    ):
        load("launch.gpus_per_node=2", "launch.tasks_per_node=4")
    load("launch.gpus_per_node=0", "launch.tasks_per_node=4")


def test_rule_errors_are_one_line():
    with pytest.raises(ConfigError) as info:
        load("train.chunk_size=9", "model.freeze_bn=false")
    assert "\n" not in str(info.value)


def test_sync_bn_needs_trainable_batchnorm():
    with pytest.raises(ConfigError, match=r"^model\.sync_bn=true with model\.freeze_bn=true"):
        load_checked(None, ["model.sync_bn=true", "model.freeze_bn=true"])
    assert load_checked(None, ["model.sync_bn=true", "model.freeze_bn=false"]).model.sync_bn


def test_loading_parses_only_and_every_command_applies_the_rules(tmp_path, capsys):
    """load_config type-checks; the rules are the entry points' (the CLI, before a command
    runs: here evaluate, which would otherwise first look for its weights)."""
    broken = ["model.sync_bn=true", "model.freeze_bn=true"]
    assert load_config(None, broken).model.sync_bn
    weights = tmp_path / "model.safetensors"
    weights.write_text("")
    assert main(["evaluate", "--weights", str(weights), *broken]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipeline evaluate: error: model.sync_bn=true with model.freeze_bn=true")
    assert len(err.splitlines()) == 1
