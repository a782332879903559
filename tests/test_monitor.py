"""The monitor renders frames from the metrics of a real short run (and from the states around it)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from aegis import metrics
from train import monitor, monitor_state

REPO = Path(__file__).resolve().parent.parent

# `short_run` (conftest.py): a finished short run of `python -m train` on the embedded model, shared by the
# session. The assertions read its schedule from its config.toml rather than assuming one.


def frame(run_dir: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "train.monitor", str(run_dir), "--once", "--width", "110"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def partial_copy(run: Path, dest: Path, upto: int, tail: str = "") -> list[dict]:
    """A copy of the run as it was after step `upto` (config and metrics only), plus an optional torn last line."""
    dest.mkdir()
    shutil.copy(run / "config.toml", dest / "config.toml")
    lines = (run / metrics.METRICS).read_text(encoding="utf-8").splitlines()[:upto]
    (dest / metrics.METRICS).write_text("\n".join(lines) + "\n" + tail, encoding="utf-8")
    return [json.loads(x) for x in lines]


def test_frame_mid_run_shows_step_phase_alpha(short_run, tmp_path):
    # A step in the middle of the transition; a writer's half-written line after it must be skipped, not fatal.
    total = monitor_state.read_schedule(short_run).total_steps
    steps = [r["step"] for r in metrics.read(short_run) if r["phase"] == "transition"]
    mid = steps[len(steps) // 2]
    recs = partial_copy(short_run, tmp_path / "mid", mid, tail=f'{{"step": {mid + 1}, "loss": 5.1')
    last = recs[-1]
    assert last["step"] == mid and last["phase"] == "transition"
    out = frame(tmp_path / "mid")
    assert f"{mid} / {total} ({mid / total:.0%})" in out
    assert "(transition)" in out
    assert f"α              {last['alpha']:+.4f}" in out
    assert -5 < last["alpha"] < 1.618
    assert f"gate           {last['gate']:.4f}" in out
    assert "target +1.6180" in out and "target 0.8345" in out
    assert "ETA" in out and "finished" not in out
    assert "WARNING" not in out
    assert "none complete yet" in out  # the copy has no checkpoints


def test_frame_after_the_run(short_run):
    total = monitor_state.read_schedule(short_run).total_steps
    last = metrics.read(short_run)[-1]
    assert last["step"] == total and last["phase"] == "golden"
    out = frame(short_run)
    assert f"{total} / {total} (100%)" in out and "finished" in out
    assert "(golden)" in out
    assert f"{last['alpha']:+.4f}" == "+1.6180" and "α              +1.6180" in out
    assert "gate           0.8345" in out
    assert f"{last['ortho_error']:.2e}" in out
    assert f"checkpoint     final (step {total})" in out
    assert "WARNING" not in out


def test_frame_before_the_run(tmp_path):
    out = frame(tmp_path / "not-yet")
    assert "waiting for the run to start" in out


def test_warnings_on_nan_spike_and_orthogonality(short_run, tmp_path):
    recs = metrics.read(short_run)
    bad = [dict(r) for r in recs]
    assert len(bad) >= 12
    bad[5]["loss"] = "nan"  # as the metrics writer stores a NaN
    bad[-2]["loss"] = bad[-3]["loss"] * 3 + 1
    bad[-1]["ortho_error"] = 3e-3
    dest = tmp_path / "bad"
    dest.mkdir()
    shutil.copy(short_run / "config.toml", dest / "config.toml")
    (dest / metrics.METRICS).write_text("".join(json.dumps(r) + "\n" for r in bad), encoding="utf-8")
    warnings = monitor_state.collect(dest).warnings
    assert any("non-finite loss" in w and "first 6" in w for w in warnings), warnings
    assert any(f"loss spike at step {bad[-2]['step']}" in w for w in warnings), warnings
    assert any("orthogonality error 3.00e-03" in w for w in warnings), warnings
    out = frame(dest)
    assert out.count("WARNING") == 3
    assert "nan" in out  # the latest loss is fine, but the trend skips the NaN instead of failing
    # the real run itself raises none of these
    assert monitor_state.collect(short_run).warnings == []


def test_live_mode_waits_then_follows_the_run(short_run, tmp_path):
    """Started before the run directory exists, the live monitor picks the run up when it appears."""
    run = tmp_path / "later"
    # A shell starts background jobs with SIGINT ignored, and a child inherits that (Python then installs no
    # KeyboardInterrupt handler): the monitor gets Ctrl-C's default handling back, as in a terminal, so the test
    # also works when pytest itself runs in the background.
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.monitor", str(run), "--interval", "0.2", "--width", "110"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        time.sleep(4)
        assert proc.poll() is None, proc.communicate()[1]
        partial_copy(short_run, run, 7)
        time.sleep(3)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the live display stops and leaves its last frame
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("the live monitor did not stop on SIGINT within 30 s") from None
    assert proc.returncode == 0, err
    total = monitor_state.read_schedule(short_run).total_steps
    assert f"7 / {total}" in out, out


def test_one_throughput_in_which_tokens_per_s_and_s_per_step_agree(short_run, tmp_path):
    # A step's own tokens_per_s leaves out what happens between steps (a checkpoint, logging), so the frame takes
    # both figures from elapsed_s over the same steps. Here the last step's tokens_per_s (411) disagrees with the
    # step times (0.5 s per 512 tokens): the frame must show 1,024 tokens/s with 0.50 s/step.
    recs = [
        {**r, "tokens": 512, "elapsed_s": 0.5 * r["step"], "tokens_per_s": 411.0} for r in metrics.read(short_run)[:10]
    ]
    dest = tmp_path / "rate"
    dest.mkdir()
    shutil.copy(short_run / "config.toml", dest / "config.toml")
    (dest / metrics.METRICS).write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    assert monitor_state.throughput(recs) == (0.5, 1024.0)
    assert "1,024 tokens/s   0.50 s/step" in frame(dest)
    # a resumed session restarts elapsed_s: only the steps after the restart count
    resumed = recs[:6] + [{**r, "elapsed_s": 0.25 * (r["step"] - 6), "tokens": 256} for r in recs[6:]]
    assert monitor_state.throughput(resumed) == (0.25, 1024.0)
    # the real run: the figures shown multiply to its tokens per step
    real = metrics.read(short_run)
    sps, tps = monitor_state.throughput(real)
    window = real[-50:]
    per_step = sum(r["tokens"] for r in window[1:]) / (window[-1]["step"] - window[0]["step"])
    assert abs(sps * tps - per_step) < 1e-6 * per_step
    assert f"{tps:,.0f} tokens/s   {sps:.2f} s/step" in frame(short_run)


def test_cli_rejects_bad_arguments(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "train.monitor", str(f), "--once"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "train.monitor", str(tmp_path), "--interval", "0"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--interval" in proc.stderr


def test_sparkline_and_number():
    assert monitor.sparkline([1.0, 2.0, 3.0, float("nan")]) == "▁▅█"
    assert metrics.number("inf") == float("inf") and metrics.number("nan") != metrics.number("nan")
    assert all(metrics.number(v) != metrics.number(v) for v in (None, True, "text"))  # not numbers: NaN
