"""Bad inputs to training and export, each met by a real `python -m train|export` process: one `error:` line naming
the file, line or key, no traceback, and nothing already written lost or half-written. A full disk is a real small
file system (a tmpfs, where this machine lets us mount one) or a real file-size limit (RLIMIT_FSIZE)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from aegis import checkpoint, manifest, metrics
from aegis.runs import SUMMARY
from conftest import ROOT, SHORT
from test_integrity import MISSING_BASE, TINY, cli, flip, one_line_error, train, train_argv


def leftovers(root: Path) -> list[Path]:
    """Temporary files or directories of an interrupted write anywhere under `root`."""
    return [p for p in Path(root).rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".tmp"]


def nothing_started(run: Path) -> None:
    """Nothing of a run was written: no config, metrics, checkpoints or summary."""
    assert not [p.name for p in (run.iterdir() if run.is_dir() else []) if p.name != "train.lock"]


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


# ---- a small real file system --------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs of its own (unmounted afterwards); `leave` fills it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    fs = tmp_path / "fs"
    fs.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(fs)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def leave(fs: Path, n: int) -> None:
    """Fill the file system at `fs` with one file so that `n` bytes are left free."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, shutil.disk_usage(fs).free - n)
    finally:
        os.close(fd)


def file_size_limit(limit: int):
    """A child's preexec_fn: a file-size limit (writes past it fail with EFBIG; Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


# ---- inputs refused before anything loads ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_is_a_config_error(tmp_path, seed):
    run = tmp_path / "run"
    line = one_line_error(train(run, f"train.seed={seed}"), "train.seed", seed, str(2**32 - 1))
    assert "--set train.seed" in line  # the value came from --set, so the message names the option
    assert not run.exists()  # refused while reading the config, before the run directory is touched


def test_a_binary_config_file_is_named_with_its_line(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_bytes(b"[train]\nseed = 1\n\x89PNG\r\n\x1a\n\x00\xff\xfe")
    proc = cli("train", "--config", str(bad), "--run-dir", str(tmp_path / "run"))
    one_line_error(proc, f"{bad}:3", "not UTF-8")
    assert not (tmp_path / "run").exists()


def test_a_base_directory_without_a_model_is_named(tiny_path, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(tiny_path / "tokenizer_config.json", base)  # a tokenizer, but no config.json and no weights
    run = tmp_path / "run"
    one_line_error(
        train(run, f"model.base={base}"), f"model.base: {base}", "no config.json", "no weights (*.safetensors)"
    )
    nothing_started(run)


def test_an_impossible_memory_plan_is_refused_before_the_model_loads(tiny_path, tmp_path):
    run = tmp_path / "run"
    proc = train(run, "train.max_length=400000000", "train.memory_budget_gib=12")
    line = one_line_error(proc, "train.max_length 400000000", "over the memory budget of 12.0 GiB")
    estimate = float(line.split("estimated at ")[1].split(" GiB")[0].replace(",", ""))
    assert estimate > 1000, line  # the estimate itself is in the message
    assert "Loading" not in proc.stderr + proc.stdout  # no weights were read
    nothing_started(run)


# ---- data --------------------------------------------------------------------------------------------------------

SURROGATE_ROWS = '{"text": "よい行です。"}\n{"text": "a\\ud800b"}\n{"text": "もう一つの行。"}\n'


def test_a_lone_surrogate_is_a_bad_line_named_by_file_and_line(tiny_path, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(SURROGATE_ROWS, encoding="utf-8")
    run = tmp_path / "run"
    one_line_error(train(run, *TINY, f'data.train=["{rows}"]'), f"{rows}:2:", "text holds a lone surrogate")
    nothing_started(run)


# ---- one trainer per run directory ---------------------------------------------------------------------------------


def test_a_second_trainer_is_refused_while_the_first_runs_and_kill_9_frees_the_directory(tiny_path, tmp_path):
    """The first trainer (which also skips a lone-surrogate line, with data.skip_bad_lines) holds the run
    directory; a --resume beside it fails at once naming its PID, where it used to read a checkpoint the live run
    then pruned. Killed with SIGKILL, the first leaves every checkpoint verified and the lock free."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(SURROGATE_ROWS * 20, encoding="utf-8")
    run = tmp_path / "run"
    log = tmp_path / "first.log"
    sets = [
        "schedule.total_steps=400",
        "schedule.warmup_steps=0",
        "schedule.anneal_steps=2",
        "train.save_steps=1",
        "train.keep_last=2",
        "train.max_length=32",
        f'data.train=["{rows}"]',
        "data.skip_bad_lines=true",
    ]
    with open(log, "w") as out:
        first = subprocess.Popen(
            train_argv(run, "--no-progress", *[a for s in sets for a in ("--set", s)]),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        deadline = time.time() + 300
        while len(metrics.read(run)) < 3:
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the first trainer made no progress"
            time.sleep(0.5)
        assert "skipped 20 bad record(s); first: " in log.read_text()
        assert f"{rows}:2: text holds a lone surrogate" in log.read_text()
        started = time.time()
        second = train(run, *sets, flags=("--resume",))
        one_line_error(second, str(run), "in use by another trainer", f"PID {first.pid}")
        assert time.time() - started < 60 and "Loading" not in second.stderr
        assert first.poll() is None  # the first one trains on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    for ckpt in checkpoint.candidates(run):
        manifest.verify(ckpt)
    # the lock died with the process: the next trainer gets past it (and stops at the shape check, before loading)
    one_line_error(train(run, *sets, MISSING_BASE, flags=("--resume",)), "cannot resume", "model.base")


# ---- a finished run resumed -----------------------------------------------------------------------------------------


def test_resuming_a_finished_run_whose_final_fails_keeps_its_summary(short_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("export*"))
    before = json.loads((run / SUMMARY).read_text())
    flip(run / checkpoint.FINAL / checkpoint.ADAPTER_WEIGHTS)
    proc = train(run, *SHORT, flags=("--resume",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping checkpoint" in proc.stdout + proc.stderr
    manifest.verify(run / checkpoint.FINAL)  # written again from step 12
    after = json.loads((run / SUMMARY).read_text())
    assert after["phase"] == before["phase"] and after["steps"] == before["steps"] == 12
    for key in ("final_loss", "alpha", "gate", "ortho_error"):
        assert after[key] is not None and after[key] == pytest.approx(before[key], rel=1e-6), key
    assert metrics.read(run) == metrics.read(short_run)


# ---- a full disk -------------------------------------------------------------------------------------------------


def test_a_checkpoint_save_on_a_full_disk_leaves_the_run_as_it_was(short_run, small_fs):
    """final/ cannot be written (half the room it needs): one line with the bytes it needs and is short of, no
    temporary directory left, every earlier file byte for byte as it was; with room again, --resume finishes."""
    run = small_fs / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("export*", checkpoint.FINAL, SUMMARY))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.lock"}
    need = size_of(run / "checkpoints" / "step_12")
    leave(small_fs, need // 2)
    proc = train(run, *SHORT, flags=("--resume",))
    line = one_line_error(proc, str(run / checkpoint.FINAL), "no space left on device", "bytes short", "--resume")
    assert f"about {need:,} bytes" in line
    assert not leftovers(small_fs) and not (run / checkpoint.FINAL).exists() and not (run / SUMMARY).exists()
    assert {p: p.read_bytes() for p in before} == before
    for ckpt in checkpoint.candidates(run):
        manifest.verify(ckpt)
    (small_fs / "filler").unlink()
    proc = train(run, *SHORT, flags=("--resume",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest.verify(run / checkpoint.FINAL)
    assert json.loads((run / SUMMARY).read_text())["final_loss"] is not None


@pytest.fixture(scope="module")
def merged(short_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hardening") / "merged"
    proc = cli(
        "export", "merge", "--checkpoint", str(short_run / checkpoint.FINAL), "--out", str(out), "--no-quant-gap"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_merge_on_a_full_disk_keeps_the_earlier_export(short_run, merged, small_fs):
    out = small_fs / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier export")
    weights = size_of(merged / "model.safetensors")
    leave(small_fs, weights // 2)
    proc = cli(
        "export", "merge", "--checkpoint", str(short_run / checkpoint.FINAL), "--out", str(out), "--no-quant-gap"
    )
    line = one_line_error(proc, str(out), "no space left on device", "bytes short")
    needed = int(line.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert weights * 0.99 < needed <= weights  # the weights' bytes, less the safetensors header
    assert (out / "keep.txt").read_text() == "an earlier export" and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not leftovers(small_fs)


def test_a_gguf_on_a_full_disk_keeps_the_earlier_file(merged, small_fs):
    out = small_fs / "tiny-f16.gguf"
    out.write_bytes(b"an earlier, good export")
    leave(small_fs, size_of(merged / "model.safetensors") // 4)  # f32 weights: an f16 file needs about half
    proc = cli(
        "export", "gguf", "--model", str(merged), "--out", str(out), "--type", "f16", "--skip-parity", "--no-progress"
    )
    one_line_error(proc, f"{out} (unchecked)", "no space left on device", "bytes short")
    assert out.read_bytes() == b"an earlier, good export"
    assert not leftovers(small_fs)


def _gguf_args(merged: Path, out: Path, kind: str) -> tuple:
    """`export gguf`'s arguments for the merged model written as `kind` at `out`, unchecked."""
    return ("--model", merged, "--out", out, "--type", kind, "--skip-parity", "--no-progress")


def test_a_k_quant_on_a_full_disk_is_one_line(merged, small_fs):
    """Room for the float intermediate but not for llama.cpp's quantized file: its writer does not say why it
    failed, so the full file system is recognised and named; the intermediate goes too."""
    out = small_fs / "tiny-q4_k_m.gguf"
    leave(small_fs, size_of(merged / "model.safetensors") + 2_000_000)
    proc = cli("export", "gguf", *_gguf_args(merged, out, "q4_k_m"))
    assert "quantizing to q4_k_m with llama.cpp" in proc.stdout  # the intermediate was written
    one_line_error(proc, str(small_fs), "tiny-q4_k_m", "no space left on device", "bytes it had written")
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]


def test_a_gguf_past_the_file_size_limit_is_one_line(merged, tmp_path):
    """The same refusal from a file-size limit (EFBIG, no root needed)."""
    out = tmp_path / "out" / "tiny-f16.gguf"
    out.parent.mkdir()
    limit = size_of(merged / "model.safetensors") // 4
    proc = cli("export", "gguf", *_gguf_args(merged, out, "f16"), preexec_fn=file_size_limit(limit))
    one_line_error(proc, f"{out} (unchecked)", f"file-size limit (ulimit -f) of {limit:,} bytes", "needs about")
    assert list(out.parent.iterdir()) == []
