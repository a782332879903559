"""AEGIS_PROFILE=N: torch's profiler over N updates of a run, after 3 warm-up updates (RUN_DIR/profile.txt)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aegis import atomic


def start(run_dir: Path):
    """AEGIS_PROFILE=N: profile N updates after 3 warm-up updates; the op table goes to RUN_DIR/profile.txt."""
    n = int(os.environ.get("AEGIS_PROFILE", "0"))
    if n <= 0:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule as prof_schedule

    def write(prof) -> None:
        avg = prof.key_averages()
        keys = ["self_cpu_time_total"] + (["self_device_time_total"] if torch.cuda.is_available() else [])
        atomic.write_text(run_dir / "profile.txt", "\n\n".join(avg.table(sort_by=k, row_limit=30) for k in keys))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(
        activities=activities, schedule=prof_schedule(wait=0, warmup=3, active=n, repeat=1), on_trace_ready=write
    )
    prof.start()
    return prof
