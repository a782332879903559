"""Shared fixtures: the embedded tiny Phi-3 (built once, cached) and a short real training run of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"
SHORT = [
    "schedule.total_steps=12",
    "schedule.warmup_steps=3",
    "schedule.anneal_steps=6",
    "train.save_steps=6",
    "train.max_length=128",
]


def train_cli(
    run_dir: Path, *overrides: str, resume: bool = False, check: bool = True, config: Path = QUICKSTART
) -> subprocess.CompletedProcess:
    """Run `python -m train` for real, as a user would."""
    cmd = [sys.executable, "-m", "train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    if resume:
        cmd.append("--resume")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from aegis.tiny import ensure

    return ensure()


@pytest.fixture(scope="session")
def short_run(tiny_path, tmp_path_factory) -> Path:
    """A finished 12-step run of the seed schedule (scaled down) on the embedded model, 4-bit."""
    run = tmp_path_factory.mktemp("short") / "run"
    train_cli(run, *SHORT)
    return run


def pytest_collection_modifyitems(config, items):
    """GPU tests run on a CUDA machine only; everywhere else they are skipped, not failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
