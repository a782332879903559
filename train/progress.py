"""Where a run stands, and the records it writes of it: each update's metrics record (metrics.jsonl), the soul's
metadata in every checkpoint, and summary.json when the run has finished."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aegis import atomic, checkpoint, runs, schedule
from aegis.config import Config


@dataclass
class Progress:
    """Where the run stands: the updates done (what a checkpoint resumes from) and this session's totals."""

    step: int = 0
    tokens: int = 0  # trained on in this session
    started: float = field(default_factory=time.time)  # this session's start
    last: dict = field(default_factory=dict)  # the newest metrics record


def metrics_record(
    p: Progress, soul, cfg: Config, lr: float, loss: float, grad_norm: float, tokens: int, seconds: float
) -> dict:
    """One update's line of metrics.jsonl: the loss, the soul's health and the throughput."""
    import torch

    health = soul.health()
    rec = {
        "step": p.step,
        "loss": loss,
        "lr": lr,
        "alpha": health["alpha"],
        "gate": health["gate"],
        "phase": schedule.phase(health["alpha"], cfg.schedule),
        "ortho_error": health["ortho_error"],
        "det_min": health["det_min"],
        "det_max": health["det_max"],
        "rotation_norm": health["rotation_norm"],
        "grad_norm": grad_norm,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "elapsed_s": time.time() - p.started,
    }
    if torch.cuda.is_available():
        rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return rec


def soul_metadata(cfg: Config, step: int) -> dict:
    return {
        "step": step,
        "schedule": asdict(cfg.schedule),
        "alpha_mode": cfg.soul.alpha_mode,
        "init": cfg.soul.init,
        "base": cfg.model.base,
        "revision": cfg.model.revision,
        "quantization": cfg.model.quantization,
        "dtype": cfg.model.dtype,
    }


def write_summary(run_dir: Path, p: Progress, soul, cfg: Config) -> dict:
    """summary.json, written whole once the final checkpoint is; returns what it holds."""
    last = p.last
    if not last:  # no step this session and none in metrics.jsonl: the soul itself still says where it stands
        health = soul.health()
        last = {k: health[k] for k in ("alpha", "gate", "ortho_error")}
        last["phase"] = schedule.phase(health["alpha"], cfg.schedule)
    summary = {
        "steps": p.step,
        "final_loss": last.get("loss"),
        "alpha": last.get("alpha"),
        "gate": last.get("gate"),
        "phase": last.get("phase"),
        "ortho_error": last.get("ortho_error"),
        "tokens_this_session": p.tokens,
        "seconds_this_session": round(time.time() - p.started, 1),
        "final": str(Path(run_dir) / checkpoint.FINAL),
    }
    atomic.write_json(Path(run_dir) / runs.SUMMARY, summary)
    return summary
