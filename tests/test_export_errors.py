"""Bad input gets a clear error naming the file or key, every argument problem is reported at once, and nothing
already written is lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aegis import manifest

ROOT = Path(__file__).resolve().parents[1]


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture
def ckpt_copy(short_run, tmp_path) -> Path:
    dest = tmp_path / "ckpt"
    shutil.copytree(short_run / "final", dest)
    return dest


@pytest.fixture
def previous_output(tmp_path) -> Path:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier export")
    return out


def test_missing_soul_is_named_and_earlier_output_kept(ckpt_copy, previous_output):
    (ckpt_copy / "soul.safetensors").unlink()
    proc = export_cli("merge", "--checkpoint", str(ckpt_copy), "--out", str(previous_output))
    assert proc.returncode == 1
    assert "soul.safetensors" in proc.stderr and str(ckpt_copy) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (previous_output / "keep.txt").read_text() == "an earlier export"
    assert sorted(p.name for p in previous_output.parent.iterdir()) == ["ckpt", "merged"]


def test_wrong_hidden_size_is_named(ckpt_copy, previous_output):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = ckpt_copy / "soul.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    meta["hidden_size"] = "64"
    save_file({"generators": torch.zeros(8, 28), "alpha": tensors["alpha"]}, str(path), metadata=meta)
    manifest.write_manifest(ckpt_copy)  # a well-formed checkpoint for another base, not a damaged one
    proc = export_cli("merge", "--checkpoint", str(ckpt_copy), "--out", str(previous_output))
    assert proc.returncode == 1
    assert "hidden_size 64" in proc.stderr and "hidden_size 256" in proc.stderr and "soul.safetensors" in proc.stderr
    assert (previous_output / "keep.txt").exists()


def test_not_a_run_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = export_cli("all", "--run", str(tmp_path / "empty"))
    assert proc.returncode == 1 and "not a run directory" in proc.stderr


def test_every_argument_problem_reported_at_once(tmp_path):
    proc = export_cli(
        "all", "--run", str(tmp_path / "nope"), "--type", "q8_0,q9_9", "--type", "f17", "--dtype", "float8"
    )
    assert proc.returncode == 2
    err = proc.stderr
    assert "'q9_9': unknown" in err and "'f17': unknown" in err and "q4_k_m" in err  # lists the known types
    assert "--run" in err and "nope" in err and "--dtype 'float8'" in err
    proc = export_cli("gguf", "--model", str(tmp_path), "--out", str(tmp_path / "x.bin"), "--type", "q3")
    assert proc.returncode == 2
    assert "no config.json" in proc.stderr and "should end in .gguf" in proc.stderr and "'q3'" in proc.stderr


def test_failed_parity_keeps_the_earlier_gguf(tiny_path, tmp_path, monkeypatch):
    from export import parity
    from export.files import ExportError
    from export.pipeline import export_gguf

    out = tmp_path / "tiny-f16.gguf"
    out.write_bytes(b"an earlier, good export")
    # A threshold nothing can meet (mean KL below zero): parity must fail.
    monkeypatch.setitem(parity.THRESHOLDS, "f16", {"top1": 0.0, "kl": -1.0, "max_abs": None})
    with pytest.raises(ExportError, match="parity failed"):
        export_gguf(tiny_path, out, "f16", progress=False, log=lambda *_: None)
    assert out.read_bytes() == b"an earlier, good export"
    assert (tmp_path / "tiny-f16.gguf.rejected").stat().st_size > 1000
    entry = json.loads((tmp_path / "parity.json").read_text())["tiny-f16.gguf"]
    assert entry["passed"] is False and entry["rejected_file"] == "tiny-f16.gguf.rejected"
    assert not list(tmp_path.glob(".tmp-*"))
