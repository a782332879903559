"""What a frame of the training monitor (train/monitor.py) shows, read from the run directory alone: the α schedule,
the metrics records, the newest checkpoint and the warnings (a non-finite value, a loss spike, a rotation that left
SO(8)). Nothing here renders, so the tests check it directly."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from aegis import checkpoint, metrics, runs, schedule
from aegis.metrics import number

ORTHO_LIMIT = 1e-4  # the rotation is exact by construction; more than this means the float32 maths went wrong
SPIKE_WINDOW = 20  # a loss is compared with the median of the losses just before it
SPIKE_MIN = 5  # ... once there are at least this many
SPIKE_FACTOR = 1.5  # ... and is a spike when above factor * median + SPIKE_MARGIN
SPIKE_MARGIN = 0.5  # the margin keeps a batch of harder text from counting as a spike at low loss
SPIKE_Z = 5.0  # ... and above the median by this many robust deviations (1.4826 * MAD): at batch 1 one example's
# loss swings widely (0.02 to 1.5 within ten steps of a healthy run), so a spike must stand out from that spread too


def read_schedule(run_dir: Path) -> schedule.Schedule | None:
    """The run's α schedule (and total steps) from its resolved config.toml; None before the run wrote it."""
    cfg = runs.read_config(run_dir)
    return cfg.schedule if cfg else None


@dataclass
class State:
    """Everything one frame shows, computed from the run directory (no rendering here, so tests can check it)."""

    run_dir: Path
    exists: bool = False
    sched: schedule.Schedule | None = None
    records: list[dict] = field(default_factory=list)
    finished: bool = False
    checkpoint: Path | None = None
    checkpoint_step: int | None = None
    metrics_age_s: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def last(self) -> dict | None:
        return self.records[-1] if self.records else None


def find_warnings(records: list[dict]) -> list[str]:
    """NaN/inf losses, loss spikes (each loss against the median of the window before it) and orthogonality."""
    out = []
    bad = [r["step"] for r in records if not math.isfinite(number(r.get("loss")))]
    if bad:
        out.append(f"non-finite loss at {len(bad)} step(s): first {bad[0]}, last {bad[-1]}")
    spikes = []
    window: list[float] = []
    for r in records:
        loss = number(r.get("loss"))
        if not math.isfinite(loss):
            continue
        if len(window) >= SPIKE_MIN:
            med = statistics.median(window)
            spread = 1.4826 * statistics.median(abs(v - med) for v in window)
            if loss > SPIKE_FACTOR * med + SPIKE_MARGIN and loss > med + SPIKE_Z * spread:
                spikes.append((r["step"], loss, med))
        window = (window + [loss])[-SPIKE_WINDOW:]
    if spikes:
        step, loss, med = spikes[-1]
        out.append(
            f"loss spike at step {step}: {loss:.3f} against a recent median of {med:.3f}"
            + (f" ({len(spikes)} spikes in all)" if len(spikes) > 1 else "")
        )
    if records:
        last = records[-1]
        ortho = number(last.get("ortho_error"))
        if not ortho <= ORTHO_LIMIT:  # also catches NaN
            out.append(
                f"orthogonality error {ortho:.2e} at step {last['step']} is above {ORTHO_LIMIT:.0e}: "
                "the rotation is no longer in SO(8)"
            )
        for key in ("grad_norm", "alpha", "gate"):
            if not math.isfinite(number(last.get(key))):
                out.append(f"{key} is {last.get(key)} at step {last['step']}")
    return out


def collect(run_dir: Path) -> State:
    run_dir = Path(run_dir)
    st = State(run_dir=run_dir, exists=run_dir.is_dir())
    if not st.exists:
        return st
    st.sched = read_schedule(run_dir)
    st.records = metrics.read(run_dir / metrics.METRICS)
    mpath = run_dir / metrics.METRICS
    if mpath.exists():
        st.metrics_age_s = max(0.0, time.time() - mpath.stat().st_mtime)
    st.finished = (run_dir / runs.SUMMARY).exists() and checkpoint.is_complete(run_dir / checkpoint.FINAL)
    st.checkpoint = checkpoint.latest(run_dir, resumable=False)
    if st.checkpoint is not None:
        try:
            st.checkpoint_step = checkpoint.read_soul(st.checkpoint)[1].get("step")
        except (checkpoint.CheckpointError, OSError, ValueError):
            st.checkpoint_step = checkpoint.step_of(st.checkpoint) if checkpoint.step_of(st.checkpoint) >= 0 else None
    st.warnings = find_warnings(st.records)
    return st


def throughput(records: list[dict], window: int = 50) -> tuple[float, float] | None:
    """(seconds per step, tokens per second) over the same recent records of the current session, so the two
    always agree (tokens/s = tokens per step / s per step). Both come from elapsed_s, the wall time since the
    session started, so they include what a step's own tokens_per_s leaves out (checkpoints, logging); elapsed_s
    restarts at 0 when a run resumes, so only the tail after the last restart counts."""
    recent = records[-window:]
    for i in range(len(recent) - 1, 0, -1):
        if number(recent[i].get("elapsed_s")) < number(recent[i - 1].get("elapsed_s")):
            recent = recent[i:]
            break
    if len(recent) >= 2:  # from the first record's end to the last's: the steps and tokens after the first
        steps = recent[-1]["step"] - recent[0]["step"]
        seconds = number(recent[-1].get("elapsed_s")) - number(recent[0].get("elapsed_s"))
        tokens = sum(number(r.get("tokens")) for r in recent[1:])
    elif recent:  # one step so far: from the session's start
        steps, seconds, tokens = 1, number(recent[0].get("elapsed_s")), number(recent[0].get("tokens"))
    else:
        return None
    if not (steps > 0 and seconds > 0 and math.isfinite(seconds)):
        return None
    return seconds / steps, tokens / seconds
