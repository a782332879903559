"""A checkpoint is proven before anything trusts it, no bad setting trains garbage, one run per directory, and every
bad input is one clear line before any model loads. Real runs of the embedded model, real files, real damage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aegis import checkpoint, manifest, metrics
from aegis.config import ConfigError, build
from conftest import QUICKSTART, ROOT, SHORT, train_cli
from support.commands import python_m

TINY = [
    "schedule.total_steps=4",
    "schedule.warmup_steps=1",
    "schedule.anneal_steps=2",
    "train.save_steps=1",
    "train.max_length=64",
]
MISSING_BASE = "model.base=/nonexistent/aegis-base"  # loading it would fail: an error about it means we got that far


cli = python_m  # a command as a user runs it


def train_argv(run_dir: Path, *more: str) -> list[str]:
    """`python -m train` of the quickstart recipe into `run_dir`, with `more` arguments."""
    return [sys.executable, "-m", "train", "--config", str(QUICKSTART), "--run-dir", str(run_dir), *more]


def train(run_dir: Path, *overrides: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    argv = train_argv(run_dir, "--no-progress", *flags, *[a for o in overrides for a in ("--set", o)])
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess, *named: str) -> str:
    """The single `error:` line of a failed command, checked to name each of `named`, with no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def flip(path: Path, offset: int = -64) -> None:
    """Flip one byte of the file's data (the end of a safetensors file is tensor data, not its header)."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path: Path, size: int = 0) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# ---- checksummed checkpoints ------------------------------------------------------------------------------------

DAMAGE = {
    "flipped adapter byte": (checkpoint.ADAPTER_WEIGHTS, flip, "sha256"),
    "flipped soul byte": (checkpoint.SOUL, flip, "sha256"),
    "flipped optimizer byte": (checkpoint.OPTIMIZER, flip, "sha256"),
    "truncated adapter": (checkpoint.ADAPTER_WEIGHTS, lambda p: truncate(p, 1000), "1000 bytes"),
    "zero-byte state": (checkpoint.STATE, truncate, "0 bytes"),
    "zero-byte manifest": ("manifest.json", truncate, "unreadable"),
    "missing manifest": ("manifest.json", Path.unlink, "cannot be verified"),
    "missing tokenizer file": ("tokenizer.json", Path.unlink, "missing"),
    "added file": ("tokenizer.model", lambda p: p.write_bytes(b"x"), "not recorded"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_names_the_damaged_file(short_run, tmp_path, damage):
    name, harm, found = DAMAGE[damage]
    ckpt = tmp_path / "final"
    shutil.copytree(short_run / "final", ckpt)
    manifest.verify(ckpt)  # intact, it verifies
    harm(ckpt / name)
    with pytest.raises(checkpoint.CheckpointError) as e:
        manifest.verify(ckpt)
    assert str(ckpt / name) in str(e.value) and found in str(e.value) and "\n" not in str(e.value)


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(short_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    flip(run / "final" / checkpoint.ADAPTER_WEIGHTS)
    truncate(run / "checkpoints" / "step_12" / checkpoint.OPTIMIZER)
    proc = train_cli(run, *SHORT, resume=True)
    out = proc.stdout + proc.stderr
    assert f"skipping checkpoint {run / 'final'}: {run / 'final' / checkpoint.ADAPTER_WEIGHTS}: sha256" in out
    assert f"{run / 'checkpoints' / 'step_12' / checkpoint.OPTIMIZER}: 0 bytes" in out
    assert f"using {run / 'checkpoints' / 'step_6'}, the newest checkpoint that verifies" in out
    full, resumed = metrics.read(short_run), metrics.read(run)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(full, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4, a["step"]
    for ckpt in checkpoint.candidates(run):
        manifest.verify(ckpt)  # the damaged ones were written again


def test_export_falls_back_and_refuses_a_named_checkpoint_that_fails(short_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("export*"))
    truncate(run / "final" / checkpoint.SOUL, 100)
    proc = cli("export", "all", "--run", str(run), "--type", "f16", "--no-progress")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{run / 'final' / checkpoint.SOUL}: 100 bytes" in proc.stdout
    assert f"using {run / 'checkpoints' / 'step_12'}, the newest checkpoint that verifies" in proc.stdout
    summary = json.loads((run / "export" / "export.json").read_text())
    assert summary["checkpoint"] == str(run / "checkpoints" / "step_12")
    for command in (
        ["all", "--run", str(run), "--checkpoint", str(run / "final")],
        ["merge", "--checkpoint", str(run / "final"), "--out", str(tmp_path / "merged")],
    ):
        one_line_error(cli("export", *command), str(run / "final" / checkpoint.SOUL), "100 bytes")
    assert not (tmp_path / "merged").exists()


def test_every_reader_refuses_a_checkpoint_that_fails(short_run, tmp_path):
    from aegis.loading import load_checkpoint
    from serve.backends.hf import HFBackend

    bad = tmp_path / "final"
    shutil.copytree(short_run / "final", bad)
    flip(bad / checkpoint.SOUL)
    named = str(bad / checkpoint.SOUL)
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        load_checkpoint(bad)
    with pytest.raises(checkpoint.CheckpointError, match="soul.safetensors: sha256"):
        HFBackend(bad, device="cpu")
    one_line_error(cli("train.chat", "--checkpoint", str(bad), "--prompt", "こんにちは"), named, "sha256")
    one_line_error(cli("train.eval", "--checkpoint", str(bad), "--data", "embedded:prose_eval.txt"), named)


# ---- non-finite is an error ----------------------------------------------------------------------------------------


def test_non_finite_settings_are_refused_by_key():
    with pytest.raises(ConfigError) as e:
        build(
            {"train": {"max_grad_norm": float("nan")}},
            ["train.lr=inf", "schedule.target_alpha=nan", "schedule.start_alpha=-inf", "lora.dropout=nan"],
        )
    text = str(e.value)
    for key in ("train.lr", "train.max_grad_norm", "schedule.target_alpha", "schedule.start_alpha", "lora.dropout"):
        assert f"{key}: must be a finite number" in text
    with pytest.raises(ConfigError, match=r"train\.lr: must be a finite number, got nan"):
        build({}, ["train.lr=nan"])


@pytest.mark.parametrize("lr, step, what", [("1e8", 2, "gradient norm nan"), ("1e20", 1, "non-finite")])
def test_a_non_finite_update_stops_the_run_at_its_step(tiny_path, tmp_path, lr, step, what):
    """A learning rate that breaks the weights: the run stops at the step where a loss, gradient norm or weight
    first stops being finite, and writes no checkpoint, final/ or metrics row from it."""
    run = tmp_path / "run"
    line = one_line_error(train(run, *TINY, f"train.lr={lr}"), f"step {step}:", what)
    assert "nothing of this step is saved" in line
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    assert [checkpoint.step_of(p) for p in checkpoint.candidates(run)] == list(range(step - 1, 0, -1))
    assert [r["step"] for r in metrics.read(run)] == list(range(1, step))


# ---- one run per directory ---------------------------------------------------------------------------------------


def test_a_directory_that_holds_a_run_is_refused_then_overwritten_on_request(short_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    before = (run / metrics.METRICS).read_bytes()
    one_line_error(train(run, *SHORT, MISSING_BASE), str(run), "already holds a run", "--resume", "--overwrite")
    assert (run / metrics.METRICS).read_bytes() == before
    proc = train(run, *TINY, flags=("--overwrite",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in metrics.read(run)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3", "step_4"]
    assert checkpoint.read_soul(run / "final")[1]["step"] == 4


def test_a_kill_before_the_first_checkpoint_leaves_each_step_once(short_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(short_run / "config.toml", run / "config.toml")
    rows = (short_run / metrics.METRICS).read_text().splitlines(keepends=True)
    (run / metrics.METRICS).write_text("".join(rows[:3]) + rows[3][:20])  # killed while writing step 4
    train_cli(run, *SHORT, resume=True)
    full, resumed = metrics.read(short_run), metrics.read(run)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(full, resumed))


# ---- clear errors, early -----------------------------------------------------------------------------------------


def _read_only(path: Path, *command: str) -> subprocess.CompletedProcess:
    """`command` with `path` on a read-only file system (a tmpfs mounted read-only in a private mount namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare for a private read-only mount")
    path.mkdir()
    mount = 'mount -t tmpfs -o ro none "$0" && exec "$@"'
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount, str(path), *command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    if "mount:" in proc.stderr or "unshare:" in proc.stderr:
        pytest.skip(f"no private read-only mount here: {proc.stderr.strip()[:200]}")
    return proc


def test_bad_run_directories_fail_before_the_model_loads(tiny_path, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    one_line_error(train(a_file, MISSING_BASE), str(a_file), "is not a directory")
    one_line_error(train(a_file / "run", MISSING_BASE), str(a_file / "run"), "cannot be written")
    ro = tmp_path / "ro"
    proc = _read_only(ro, *train_argv(ro / "run", "--set", MISSING_BASE))
    one_line_error(proc, str(ro / "run"), "Read-only file system")


def test_resume_with_a_changed_shape_names_the_keys(short_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    shutil.rmtree(run / "final")
    proc = train(run, *SHORT, "lora.r=8", "soul.alpha_mode=learned", "lora.dropout=0.1", flags=("--resume",))
    line = one_line_error(
        proc,
        str(run / "checkpoints" / "step_12"),
        "lora.r (16 there, 8 now)",
        "soul.alpha_mode ('scheduled' there, 'learned' now)",
    )
    assert "dropout" not in line  # a setting that keeps the shapes may change on resume
    assert "Loading weights" not in proc.stderr


def test_export_to_a_path_that_cannot_be_written(short_run, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    proc = cli("export", "all", "--run", str(short_run), "--out", str(a_file / "export"))
    one_line_error(proc, f"--out {a_file / 'export'}", f"{a_file} is not a directory")
    ro = tmp_path / "ro"
    proc = _read_only(ro, sys.executable, "-m", "export", "all", "--run", str(short_run), "--out", str(ro / "out"))
    one_line_error(proc, f"--out {ro / 'out'}", "Read-only file system")


def test_data_files_that_hold_nothing_to_learn_or_no_text(tiny_path, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n', encoding="utf-8")
    one_line_error(train(tmp_path / "r1", f'data.train=["{empty}"]'), f"{empty}:1: 'text' must be a non-empty")
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(os.urandom(64) + b"\xff\xfe" + os.urandom(64))
    one_line_error(train(tmp_path / "r2", f'data.train=["{garbage}"]'), str(garbage), "not UTF-8")


@pytest.mark.slow
def test_kill_soak(tiny_path, tmp_path):
    """bench/kill_soak.py, small: random SIGKILLs, every checkpoint verifies after each, the curve is unchanged."""
    work = tmp_path / "soak"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kill_soak.py"), "--kills", "3", "--steps", "10", "--work", str(work)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / "soak.json").read_text())
    assert report["problems"] == [] and len(report["events"]) == 3
    assert any(e.startswith("killed") for e in report["events"]), report["events"]
