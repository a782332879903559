"""What every export step shares: the error type, finding a run's checkpoint, and writing files so that a crash or a
failed check never replaces something good with something half-written (write under a temporary name, rename)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from aegis import checkpoint, runs
from aegis.digest import sha256_file
from aegis.errors import AegisError, no_space, out_of_room

TMP_PREFIX = ".tmp-"


class ExportError(AegisError):
    """A problem with the user's input or a failed check; the message names the file or key."""


def tmp_sibling(dest: Path) -> Path:
    return dest.with_name(f"{TMP_PREFIX}{dest.name}-{os.getpid()}")


@contextlib.contextmanager
def atomic_dir(dest: Path, needed: int | None = None, shown: str | None = None):
    """Yields a fresh temporary directory beside `dest`; on success it replaces `dest` in one rename. On failure it
    is removed; a failure for want of room is then a NoSpaceError naming `dest` (or `shown`) with `needed` bytes."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(dest)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_no_space(e, dest, needed, shown)
        raise
    if dest.exists():
        old = dest.with_name(f"{TMP_PREFIX}old-{dest.name}-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


@contextlib.contextmanager
def atomic_file(dest: Path, needed: int | None = None, shown: str | None = None):
    """Yields a temporary path beside `dest`; on success it is renamed onto `dest`, on failure removed (and a
    failure for want of room is a NoSpaceError, as in `atomic_dir`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(dest)
    try:
        yield tmp
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _raise_no_space(e, dest, needed, shown)
        raise
    os.replace(tmp, dest)


def _raise_no_space(e: BaseException, dest: Path, needed: int | None, shown: str | None) -> None:
    if isinstance(e, Exception) and not isinstance(e, AegisError) and out_of_room(e):
        raise no_space(dest, e, needed, shown=shown) from None


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


def write_text(dest: Path, text: str) -> None:
    data = text.encode("utf-8")
    with atomic_file(dest, len(data)) as tmp:
        tmp.write_bytes(data)


def write_json(dest: Path, data) -> None:
    write_text(dest, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


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
        raise ExportError(f"{run_dir}: no complete checkpoint that verifies ({checkpoint.FINAL}/ or "
                          f"{checkpoint.CHECKPOINTS}/step_N/ with {', '.join(checkpoint.REQUIRED)} and a "
                          f"{checkpoint.MANIFEST} they match)")
    return found
