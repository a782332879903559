"""kill -9 soak: SIGKILL a training run at random moments, resume it after each kill, then verify every checkpoint
and compare the curve with an uninterrupted run of the same configuration.

    python bench/kill_soak.py --kills 10 [--steps 40] [--seed 0] [--work /tmp/aegis-soak] [--set KEY=VALUE ...]

Kills land at random: some while the process starts (imports, model load), the rest at a random moment of a random
update, which with train.save_steps=1 is often inside a checkpoint save. Exit 0 when every checkpoint verifies,
metrics.jsonl holds each step exactly once, and every step's loss and the final adapter match the uninterrupted
run's; 1 otherwise, with each difference named. The report also goes to WORK/soak.json."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aegis import checkpoint, manifest, metrics  # noqa: E402


def train_cmd(config: Path, run_dir: Path, sets: list[str], resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"]
    return cmd + [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else [])


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in metrics.read(run_dir)), default=0)


def newest_step(run_dir: Path) -> int:
    ckpt = checkpoint.newest_verified(run_dir, log=lambda *_: None)
    return 0 if ckpt is None else checkpoint.read_state(ckpt)["step"]


def reference(config: Path, run_dir: Path, sets: list[str]) -> tuple[float, float]:
    """The uninterrupted run; returns (seconds until its first update was recorded, seconds per update)."""
    t0 = time.time()
    proc = subprocess.Popen(
        train_cmd(config, run_dir, sets, False), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    first = None
    while proc.poll() is None:
        if first is None and last_step(run_dir) >= 1:
            first = time.time() - t0
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    total = time.time() - t0
    first = first or total / 2
    return first, max((total - first) / max(last_step(run_dir) - 1, 1), 0.01)


def kill_once(
    cmd: list[str], run_dir: Path, startup: float, per_step: float, target: int | None, rng: random.Random
) -> str:
    """Start the run (resuming), SIGKILL it during start-up (target None) or inside update `target` or later."""
    start = newest_step(run_dir)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if target is None:
        time.sleep(rng.uniform(0, startup))
    else:
        target = max(target, start + 2)  # rows to one past the resume point may be left over until start-up ends
        while proc.poll() is None and last_step(run_dir) < target:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, per_step * 1.5))
    if proc.poll() is not None:
        return f"finished before the kill (exit {proc.returncode})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    where = "during start-up" if target is None else f"in the save of step {target} or a later update"
    return f"killed {where}; resumed from step {start}, newest checkpoint now step {newest_step(run_dir)}"


def unverified(run_dir: Path) -> list[str]:
    """The problem with each checkpoint of the run that does not verify."""
    problems = []
    for ckpt in checkpoint.candidates(run_dir):
        try:
            manifest.verify(ckpt)
        except checkpoint.CheckpointError as e:
            problems.append(str(e))
    return problems


def check(ref_dir: Path, run_dir: Path, tolerance: float) -> list[str]:
    """Every difference between the soaked run and the uninterrupted one, and every checkpoint that fails."""
    problems = unverified(run_dir)
    ref, got = metrics.read(ref_dir), metrics.read(run_dir)
    if [r["step"] for r in got] != [r["step"] for r in ref]:
        problems.append(f"metrics.jsonl steps {[r['step'] for r in got]}, expected each of 1..{len(ref)} once")
    for a, b in zip(ref, got):
        if abs(a["loss"] - b["loss"]) > tolerance:
            problems.append(f"step {a['step']}: loss {b['loss']!r}, uninterrupted {a['loss']!r}")
    if not (run_dir / checkpoint.FINAL).is_dir():
        return problems + [f"{run_dir / checkpoint.FINAL}: missing"]
    x = checkpoint.adapter_weights(ref_dir / checkpoint.FINAL)
    y = checkpoint.adapter_weights(run_dir / checkpoint.FINAL)
    worst = max(float((x[k] - y[k]).abs().max()) for k in x)
    if worst > tolerance:
        problems.append(f"final adapter differs from the uninterrupted run's by {worst:.3g}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10, help="how many SIGKILLs (default 10)")
    ap.add_argument("--steps", type=int, default=40, help="schedule.total_steps (default 40; more than --kills)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.toml")
    ap.add_argument("--work", type=Path, default=Path("/tmp/aegis-soak"), help="replaced on each soak")
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="more config overrides (both runs)"
    )
    ap.add_argument("--tolerance", type=float, default=1e-5, help="largest loss difference allowed")
    args = ap.parse_args(argv)
    if not 0 < args.kills < args.steps:
        ap.error("--kills must be at least 1 and fewer than --steps")
    sets = [
        f"schedule.total_steps={args.steps}",
        f"schedule.warmup_steps={args.steps // 8}",
        f"schedule.anneal_steps={args.steps // 2}",
        "train.save_steps=1",
        "train.keep_last=3",
        "train.max_length=64",
        *args.sets,
    ]
    shutil.rmtree(args.work, ignore_errors=True)
    ref_dir, run_dir = args.work / "uninterrupted", args.work / "soaked"
    startup, per_step = reference(args.config, ref_dir, sets)
    print(f"uninterrupted run: first update after {startup:.1f} s, {per_step:.2f} s per update")
    rng = random.Random(args.seed)
    targets = sorted(rng.sample(range(1, args.steps), args.kills))
    cmd = train_cmd(args.config, run_dir, sets, resume=True)
    events, problems = [], []
    for i, target in enumerate(targets, 1):
        event = kill_once(cmd, run_dir, startup, per_step, None if rng.random() < 0.25 else target, rng)
        events.append(event)
        bad = unverified(run_dir)  # what the kill left must verify before the next resume touches it
        problems += [f"after kill {i}: {p}" for p in bad]
        print(
            f"kill {i}/{args.kills}: {event}; {len(checkpoint.candidates(run_dir)) - len(bad)} checkpoint(s) "
            f"verify, {len(bad)} do not"
        )
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        problems.append(f"the last resume failed ({done.returncode}): {done.stderr[-2000:]}")
    problems += check(ref_dir, run_dir, args.tolerance)
    report = {
        "kills": args.kills,
        "steps": args.steps,
        "seed": args.seed,
        "events": events,
        "checkpoints": [str(p) for p in checkpoint.candidates(run_dir)],
        "problems": problems,
    }
    (args.work / "soak.json").write_text(json.dumps(report, indent=1))
    for p in problems:
        print(f"FAIL: {p}")
    print(
        f"{'FAIL' if problems else 'ok'}: {len(events)} kills, {len(report['checkpoints'])} checkpoints verified, "
        f"{args.steps} steps compared with the uninterrupted run; report in {args.work / 'soak.json'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
