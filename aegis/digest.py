"""File digests: a SHA-256 written beside a file (`NAME.sha256`, in `sha256sum`'s format so the command line can
check it too) and the one way to verify it. Export writes one beside each GGUF; serve checks it before loading."""

from __future__ import annotations

from pathlib import Path

from .atomic import sha256_file, write_text
from .errors import AegisError

SUFFIX = ".sha256"


class DigestError(AegisError):
    """A file does not match its recorded digest, or the record is unreadable; the message names the file."""


def sidecar(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def write_sidecar(path: Path, digest: str | None = None) -> Path:
    """Writes `path.sha256` whole for `path`; `digest` when already known, else computed."""
    path = Path(path)
    dest = sidecar(path)
    write_text(dest, f"{digest or sha256_file(path)}  {path.name}\n")
    return dest


def recorded(path: Path) -> str | None:
    """The digest recorded beside `path`, or None when there is no record."""
    record = sidecar(path)
    if not record.is_file():
        return None
    first = record.read_text(encoding="ascii", errors="replace").split()
    if not first or len(first[0]) != 64 or any(c not in "0123456789abcdef" for c in first[0].lower()):
        raise DigestError(f"{record}: not a SHA-256 record (expected '<64 hex digits>  {Path(path).name}')")
    return first[0].lower()


def verify(path: Path) -> str:
    """Checks `path` against its `.sha256` record; returns the digest. DigestError when the record is missing or
    does not match."""
    path = Path(path)
    want = recorded(path)
    if want is None:
        raise DigestError(
            f"{path}: no {sidecar(path).name} beside it to verify against (export writes one; "
            f"pass --no-verify for a file from elsewhere)"
        )
    got = sha256_file(path)
    if got != want:
        raise DigestError(
            f"{path}: SHA-256 {got[:16]}... does not match {sidecar(path).name} ({want[:16]}...): "
            f"the file is damaged or was changed after export"
        )
    return got
