"""The project as a wheel: it builds, ships every YAML under pipeline/conf, and a non-editable
install run from another directory loads conf/... configs (users install the wheel, not the
repository)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PIP = (sys.executable, "-m", "pip")

pytestmark = pytest.mark.slow


def _tracked_copy(dst: Path) -> Path:
    """The repository's tracked files (symlinks kept), so the build writes nothing into it."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src, out = REPO / name.decode(), dst / name.decode()
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out, follow_symlinks=False)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _tracked_copy(tmp / "src")
    proc = subprocess.run(
        [
            *PIP,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deprecated" not in proc.stderr, proc.stderr  # e.g. the license table form
    (found,) = (tmp / "dist").glob("smoothap_pipeline-*.whl")
    return found


def test_wheel_lists_every_yaml_under_pipeline_conf(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "pipeline" / "conf").rglob("*.yaml")}
    assert shipped, "no YAML under pipeline/conf"
    assert shipped <= names, sorted(shipped - names)
    assert "pipeline/conf/deepspeed/zero1.yaml" in names
    assert any(n.startswith("launch/") for n in names)
    assert not any(n.startswith("tests/") for n in names)


def test_installed_wheel_loads_conf_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [*PIP, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "exp.yaml").write_text(
        "train:\n  zero_stage: 1\n  deepspeed_config: conf/deepspeed/zero1.yaml\n"
    )
    script = textwrap.dedent(
        """
        import pipeline
        from pipeline.config.load import load_config
        from pipeline.train.engine import deepspeed_config

        print(pipeline.__file__)
        demo = load_config("conf/demo.yaml")
        assert demo.model.backbone == "resnet10t", demo.model
        cfg = load_config("exp.yaml")
        ds = deepspeed_config(cfg.train, cfg.sampler.batch_size_per_gpu, 2)
        assert ds["zero_optimization"]["stage"] == 1, ds
        assert ds["zero_optimization"]["reduce_bucket_size"] == 500000000, ds
        print("ok")
        """
    )
    # The venv's own packages (torch, yaml) stay importable; the project comes from the
    # installed wheel (PYTHONPATH precedes site-packages and the repo's editable finder).
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, last = proc.stdout.split()[0], proc.stdout.split()[-1]
    assert Path(first).resolve().is_relative_to(site.resolve()), first
    assert last == "ok"
    assert not (elsewhere / "conf").exists()
