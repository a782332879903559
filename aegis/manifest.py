"""The manifest of a checkpoint directory: the size and sha256 of every file, written last, verified by every reader
before anything trusts the directory (aegis/checkpoint.py says what a checkpoint holds)."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import sha256_file
from .errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _files(ckpt: Path) -> list[str]:
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(ckpt: Path) -> None:
    """Record the size and sha256 of every file in `ckpt` (called last, before the directory is committed)."""
    ckpt = Path(ckpt)
    files = {name: {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)} for name in _files(ckpt)}
    (ckpt / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1))


def verify(ckpt: Path) -> None:
    """Raise CheckpointError unless every file in `ckpt` has the size and sha256 its manifest recorded (and no file
    is missing or unrecorded). The message names each file that fails, with what was recorded and what was found."""
    ckpt = Path(ckpt)
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing, so the checkpoint cannot be verified (written before AEGIS "
            f"recorded digests, or not a checkpoint); it is not used"
        )
    try:
        files = json.loads(path.read_text())["files"]
        recorded = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    problems = [f"{ckpt / name}: not recorded in {MANIFEST}" for name in _files(ckpt) if name not in recorded]
    for name, (size, digest) in recorded.items():
        f = ckpt / name
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != size:
            problems.append(f"{f}: {f.stat().st_size} bytes, {size} recorded (truncated or overwritten)")
        elif (found := sha256_file(f)) != digest:
            problems.append(f"{f}: sha256 {found[:16]}…, {digest[:16]}… recorded (the file changed on disk)")
    if problems:
        raise CheckpointError("; ".join(problems))
