"""A run directory, as training writes it and every later stage reads it:

    RUN/config.toml              the resolved config, written before the first step
    RUN/metrics.jsonl            one record per logged step (aegis/metrics.py)
    RUN/checkpoints/step_N/      complete step checkpoints, and RUN/final/ when the schedule ends (aegis/checkpoint.py)
    RUN/summary.json             written last, when the run has finished
    RUN/train.lock               locked by the trainer using the directory (train/rundir.py); it stays, unlocked
    RUN/export/                  what `python -m export` makes of it

The run's config is read here and nowhere else, through the same loader and validation as a config file. What
training writes beside its checkpoints is written whole (aegis/atomic.py)."""

from __future__ import annotations

from pathlib import Path

from .atomic import write_text
from .config import Config, load, to_toml

CONFIG = "config.toml"
SUMMARY = "summary.json"


def read_config(run_dir: Path) -> Config | None:
    """The run's resolved config; None while the run has not written it. A config.toml that does not parse or
    validate raises ConfigError naming the file and key."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    return load(path)


def write_config(run_dir: Path, cfg: Config) -> None:
    write_text(Path(run_dir) / CONFIG, to_toml(cfg))


def run_of(ckpt: Path) -> Path | None:
    """The run directory holding a checkpoint (RUN/final or RUN/checkpoints/step_N); None for one on its own."""
    ckpt = Path(ckpt).resolve()
    for cand in (ckpt.parent, ckpt.parent.parent):
        if (cand / CONFIG).is_file():
            return cand
    return None
