"""Live terminal monitor of a training run: python -m train.monitor RUN_DIR [--once] [--interval S]

It reads only what the run writes: config.toml (total steps and the α schedule), metrics.jsonl (through
aegis.metrics.read, which skips a truncated last line) and the checkpoint directories. So it works while the run
is going, after it has ended, and before it has started (then it waits for the directory to appear).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from aegis import cli, schedule
from aegis.cli import setting
from aegis.metrics import number

from .monitor_state import ORTHO_LIMIT, SPIKE_WINDOW, State, collect, throughput

PROG = "python -m train.monitor"
SPARK = "▁▂▃▄▅▆▇█"
PHASES = (("chaos", "chaos"), ("transition", "transition"), ("golden", "golden ratio"))


def sparkline(values: list[float], width: int = 48) -> str:
    """Block characters for the finite values, averaged into at most `width` buckets (whole run, left to right)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    buckets = min(width, len(vals))
    means = []
    for i in range(buckets):
        chunk = vals[i * len(vals) // buckets : (i + 1) * len(vals) // buckets]
        means.append(sum(chunk) / len(chunk))
    lo, hi = min(means), max(means)
    if hi - lo < 1e-12:
        return SPARK[3] * len(means)
    return "".join(SPARK[min(len(SPARK) - 1, int((m - lo) / (hi - lo) * len(SPARK)))] for m in means)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _fmt(value, spec: str) -> str:
    v = number(value)
    return format(v, spec) if math.isfinite(v) else str(value)


def _phase_line(current: str) -> Text:
    t = Text()
    for i, (key, label) in enumerate(PHASES):
        if i:
            t.append(" → ", style="dim")
        t.append(label, style="bold reverse" if key == current else "dim")
    return t


def render(st: State):
    """One frame: the run's progress, the soul's schedule and health, the loss, and any warning."""
    title = f"AEGIS run {st.run_dir}"
    if not st.exists:
        return Panel(
            Text(f"waiting for the run to start: {st.run_dir} does not exist yet", style="yellow"),
            title=title,
            box=box.ROUNDED,
        )
    if st.last is None:
        msg = "waiting for the first step (no metrics yet)"
        if st.sched is None:
            msg = "waiting for the run to start (no config.toml yet)"
        return Panel(Text(msg, style="yellow"), title=title, box=box.ROUNDED)
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for rows in (_progress_rows, _soul_rows, _loss_rows, _health_rows):
        for label, value in rows(st):
            table.add_row(label, value)
    parts = [table] + [Text(f"WARNING: {w}", style="bold red") for w in st.warnings]
    return Panel(
        Group(*parts),
        title=title,
        box=box.ROUNDED,
        border_style="red" if st.warnings else ("green" if st.finished else "blue"),
    )


def _progress_rows(st: State) -> list[tuple[str, object]]:
    """step / total with the ETA (or finished, or how long no step came)."""
    total = st.sched.total_steps if st.sched else None
    step = st.last["step"]
    prog = f"{step} / {total} ({min(1.0, step / total):.0%})" if total else f"{step} / ? (no config.toml)"
    rate = throughput(st.records)
    if st.finished:
        prog += "  finished"
    elif total and rate:
        prog += f"  ETA {duration(max(0, total - step) * rate[0])}"
    if st.metrics_age_s is not None and not st.finished and st.metrics_age_s > 120:
        prog += f"  (no new step for {duration(st.metrics_age_s)})"
    return [("step", prog)]


def _soul_rows(st: State) -> list[tuple[str, object]]:
    """The phase, α and gate, beside what the schedule sets and aims at."""
    last, sched = st.last, st.sched
    alpha_line = f"{_fmt(last.get('alpha'), '+.4f')}"
    gate_line = f"{_fmt(last.get('gate'), '.4f')}"
    if sched:
        alpha_line += (
            f"   scheduled {schedule.alpha_for_step(last['step'], sched):+.4f}   target {sched.target_alpha:+.4f}"
        )
        gate_line += f"   target {schedule.gate(sched.target_alpha):.4f}"
    phase = Text.assemble(_phase_line(last.get("phase", "")), f"   ({last.get('phase')})")
    return [("phase", phase), ("α", alpha_line), ("gate", gate_line)]


def _loss_rows(st: State) -> list[tuple[str, object]]:
    """The newest loss, the recent mean and the minimum, and the trend over the whole run."""
    losses = [number(r.get("loss")) for r in st.records]
    finite = [v for v in losses if math.isfinite(v)]
    loss_text = Text(_fmt(st.last.get("loss"), ".4f"), style="bold" if math.isfinite(losses[-1]) else "bold red")
    if finite:
        recent = finite[-SPIKE_WINDOW:]
        loss_text.append(f"   mean of last {len(recent)} {sum(recent) / len(recent):.4f}   min {min(finite):.4f}")
    return [("loss", loss_text), ("trend", Text(sparkline(losses), style="cyan"))]


def _health_rows(st: State) -> list[tuple[str, object]]:
    """The soul's structure, the throughput, the GPU's memory and the newest complete checkpoint."""
    last = st.last
    rows: list[tuple[str, object]] = [
        ("ortho error", f"{_fmt(last.get('ortho_error'), '.2e')}   (limit {ORTHO_LIMIT:.0e})"),
        ("det range", f"{_fmt(last.get('det_min'), '.6f')} … {_fmt(last.get('det_max'), '.6f')}"),
        ("rotation norm", f"{_fmt(last.get('rotation_norm'), '.4f')}   (‖R − I‖, 0 = identity)"),
    ]
    rate = throughput(st.records)
    if rate:
        rows.append(("throughput", f"{rate[1]:,.0f} tokens/s   {rate[0]:.2f} s/step   (recent steps)"))
    if "gpu_mem_gib" in last:
        rows.append(("GPU memory", f"{_fmt(last.get('gpu_mem_gib'), '.2f')} GiB (peak)"))
    if st.checkpoint is None:
        return rows + [("checkpoint", Text("none complete yet", style="dim"))]
    ck = f"{st.checkpoint.relative_to(st.run_dir)}"
    if st.checkpoint_step is not None:
        ck += f" (step {st.checkpoint_step})"
    return rows + [("checkpoint", ck)]


@dataclass
class Args:
    """Watch a training run: step, phase, α/gate, loss trend, soul health. It reads only what the run writes, so it
    works before the run starts (it waits for the directory), while it goes and after it ends."""

    run_dir: Path = setting(
        help="the run directory given to `python -m train --run-dir`",
        metavar="RUN_DIR",
        env="AEGIS_RUN_DIR",
        positional=True,
        required=True,
    )
    once: bool = setting(False, "print one frame and exit")
    interval: float = setting(1.0, "seconds between refreshes", parse=cli.bounded(float, 0, strict=True))
    width: int | None = setting(None, "frame width in columns (default: the terminal's)", parse=cli.bounded(int, 40))

    def problems(self) -> list[str]:
        if self.run_dir is not None and self.run_dir.exists() and not self.run_dir.is_dir():
            return [f"RUN_DIR {self.run_dir}: a file, not a run directory"]
        return []


def watch(args: Args) -> None:
    console = Console(width=args.width)
    try:
        if args.once:
            console.print(render(collect(args.run_dir)))
            return
        with Live(render(collect(args.run_dir)), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(render(collect(args.run_dir)), refresh=True)
    except KeyboardInterrupt:
        return


def main(argv: list[str] | None = None) -> int:
    return cli.main(lambda: watch(cli.parse(Args, sys.argv[1:] if argv is None else argv, prog=PROG)))


if __name__ == "__main__":
    sys.exit(main())
