"""Checkpoint manifests (pipeline.train.manifest) against hashlib and real files."""

from __future__ import annotations

import hashlib
import json

from pipeline.train import manifest


def _checkpoint(folder):
    folder.mkdir()
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"w" * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / "zero_pp_rank_1_optim_states.pt").write_bytes(bytes(range(256)) * 9)
    return folder


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    folder = _checkpoint(tmp_path / "step_00000004")
    manifest.write(folder, {"step": 4})
    record = json.loads((folder / manifest.MANIFEST).read_text())
    assert record["step"] == 4 and record["version"] == manifest.VERSION
    data = (folder / "sub" / "zero_pp_rank_1_optim_states.pt").read_bytes()
    assert record["files"]["sub/zero_pp_rank_1_optim_states.pt"] == {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert set(record["files"]) == {
        "mp_rank_00_model_states.pt",
        "sub/zero_pp_rank_1_optim_states.pt",
    }
    assert manifest.verify(folder) is None
    assert manifest.total_bytes(folder) == 1000 + len(data)


def test_verify_names_what_is_wrong(tmp_path):
    folder = _checkpoint(tmp_path / "a")
    assert "no manifest.json" in manifest.verify(folder)
    manifest.write(folder)
    model = folder / "mp_rank_00_model_states.pt"
    model.write_bytes(b"w" * 600)  # truncated
    assert manifest.verify(folder) == (
        "mp_rank_00_model_states.pt has 600 bytes, the manifest says 1000"
    )
    model.write_bytes(b"x" * 1000)  # same size, other bytes
    assert manifest.verify(folder, checksums=False) is None
    assert "differs from the manifest" in manifest.verify(folder)
    model.unlink()
    assert manifest.verify(folder) == "mp_rank_00_model_states.pt is missing"
    (folder / manifest.MANIFEST).write_text("{not json")
    assert "unreadable" in manifest.verify(folder)
