"""Shared fixtures: tiny synthetic shards written once per session, the tiny run config as a
YAML file, and the expensive services started once per session for every test that needs them:
a real ``mlflow server`` on 127.0.0.1 and the multi-host Slurm of tests/cluster. The builders
themselves live in tests/tiny.py, tests/data_helpers, tests/mlflow_server.py and
tests/cluster (importable from spawned processes, where fixtures do not reach)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster.cluster import NamespaceCluster
from tests.data_helpers import tiny_split
from tests.mlflow_server import MlflowServer
from tests.tiny import make_synthetic_shards, tiny_run_config, write_config


def _key(kwargs: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Callable[..., Path]:
    """``synthetic_shards(classes=, test_classes=, images_per_class=, samples_per_shard=,
    image_size=32)``: a directory holding ``train/`` and ``test/`` written by the real
    ``pipeline make-shards synthetic``, once per session for each set of sizes. Shared: read
    it, never change it (copy it first)."""
    made: dict[tuple, Path] = {}

    def get(**sizes) -> Path:
        key = _key(sizes)
        if key not in made:
            made[key] = make_synthetic_shards(tmp_path_factory.mktemp("shards"), **sizes)
        return made[key]

    return get


@pytest.fixture(scope="session")
def synthetic_split(tmp_path_factory) -> Callable[..., Path]:
    """``synthetic_split(**kwargs)``: one split written by ``write_split`` (the keywords of
    ``tests.data_helpers.tiny_split``), once per session for each set of keywords. Shared:
    read it, never change it (copy it first)."""
    made: dict[tuple, Path] = {}

    def get(**kwargs) -> Path:
        key = _key(kwargs)
        if key not in made:
            made[key] = tiny_split(tmp_path_factory.mktemp("split"), **kwargs)
        return made[key]

    return get


@pytest.fixture
def tiny_config(tmp_path) -> Callable[..., Path]:
    """``tiny_config(shards, name="run", **sections)``: ``tests.tiny.tiny_run_config`` written
    to ``tmp_path/<name>.yaml``, training into ``tmp_path/<name>``; ``sections`` deep-merge
    over it (``sampler={"steps_per_epoch": 8}``)."""

    def write(shards: Path, name: str = "run", **sections: dict) -> Path:
        cfg = tiny_run_config(shards, tmp_path / name, **sections)
        return write_config(tmp_path / f"{name}.yaml", cfg)

    return write


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """One real ``mlflow server`` on 127.0.0.1 for the session (a start costs about 7 CPU-s),
    stopped at the end. Shared: create your own experiment (a name no other test
    uses) and never stop the server; a test that kills or restarts its server on purpose
    starts its own ``MlflowServer``."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


CLUSTER_HOSTS = 2


@pytest.fixture(scope="session")
def namespace_cluster() -> NamespaceCluster:
    """The multi-host Slurm of tests/cluster/start_cluster.sh (2 hosts in network namespaces),
    started once for the session when none answers (as root; skipped otherwise) and stopped at
    the end, also when a test fails; a cluster started by hand is used and left running (only
    the session's jobs are cancelled). A test that takes a host away gives it back before it
    ends, so that the next test finds every host idle."""
    cluster = NamespaceCluster(CLUSTER_HOSTS)
    try:
        cluster.ensure()
    except PermissionError as e:
        pytest.skip(str(e))
    except BaseException:
        cluster.close()  # a half-started cluster is stopped too
        raise
    try:
        yield cluster
    finally:
        cluster.close()


def _forget_deepspeeds_world_group() -> None:
    """DeepSpeed keeps the clone of the world group it made (deepspeed.utils.groups) for the
    life of the process; once that group is destroyed, the next module's engine would use the
    stale clone ("Group ... is not registered"), so it is dropped whenever no group exists."""
    import deepspeed.utils.groups
    import torch

    if not torch.distributed.is_initialized():
        deepspeed.utils.groups._WORLD_GROUP = None


@pytest.fixture(scope="module")
def single_process():
    """One training process for the module, in the test process (no torchrun; DeepSpeed keeps
    its group until the process ends, so the group is made once); afterwards, no process
    group, no stale DeepSpeed group, the caller's environment and the default logging again."""
    import logging
    import os

    import torch

    from pipeline import logs
    from pipeline.distributed import group

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID")
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _forget_deepspeeds_world_group()
    yield
    group.destroy()  # the one-process group DeepSpeed needs (pipeline.train.engine)
    _forget_deepspeeds_world_group()
    os.environ.pop("LOCAL_RANK", None)  # set for DeepSpeed by pipeline.train.engine
    os.environ.update(saved)
    torch.set_num_threads(threads)
    root = logging.getLogger(logs.LOGGER)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.propagate = True
