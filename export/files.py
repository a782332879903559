"""What every export step shares: the error type, finding a run's checkpoint, and the checks before anything is
written. Every file and directory export makes is written whole through aegis/atomic.py, so a crash or a
failed check never replaces something good with something half-written."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from aegis import checkpoint, manifest, runs
from aegis.atomic import TMP_PREFIX, sha256_file
from aegis.errors import AegisError


class ExportError(AegisError):
    """A problem with the user's input or a failed check; the message names the file or key."""


def unwritable(dest: Path) -> str | None:
    """Why nothing can be written at `dest` (a file or directory to be made), or None when it can: its nearest
    existing folder must be a directory that takes a new file (tried, then removed)."""
    folder = Path(dest).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=TMP_PREFIX):
            pass
    except OSError as e:
        return f"{folder} cannot be written ({e.strerror or e})"
    return None


def fingerprint(paths: list[Path]) -> str:
    """A short digest of some files' contents (to tell whether an earlier export came from the same input)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:16]


def find_checkpoint(run_dir: Path, log=print) -> Path:
    """The run's newest checkpoint that verifies: final/, else the newest step checkpoint. Each newer one that fails
    its digests is reported and skipped."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    if not (run_dir / runs.CONFIG).is_file() and not (run_dir / checkpoint.CHECKPOINTS).is_dir():
        raise ExportError(f"{run_dir}: not a run directory (no {runs.CONFIG} and no {checkpoint.CHECKPOINTS}/)")
    found = checkpoint.newest_verified(run_dir, resumable=False, log=log)
    if found is None:
        raise ExportError(
            f"{run_dir}: no complete checkpoint that verifies ({checkpoint.FINAL}/ or "
            f"{checkpoint.CHECKPOINTS}/step_N/ with {', '.join(checkpoint.REQUIRED)} and a "
            f"{manifest.MANIFEST} they match)"
        )
    return found
