"""An AEGIS command run as a user runs it: `python -m MODULE ARGS` (or `python ARGS`) from the repository, its output
captured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def python(*args, timeout: float = 600, **run) -> subprocess.CompletedProcess:
    """`python ARGS` (each argument as text) in the repository, with stdout and stderr captured as text; `run` goes
    to subprocess.run (env=, preexec_fn=)."""
    argv = [sys.executable, *map(str, args)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, **run)


def python_m(module: str, *args, timeout: float = 600, **run) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS`, as python() runs it."""
    return python("-m", module, *args, timeout=timeout, **run)
