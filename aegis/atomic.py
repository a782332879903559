"""Whole-file writes and file digests, the one way AEGIS writes what a later reader trusts (a run directory's files,
a checkpoint, an export, a report).

A file or directory is made under a temporary name beside its destination (`.tmp-...`, on the same file system,
and skipped by every reader), flushed to disk, then renamed onto the destination in one step: a reader finds the
older version or the new one, never part of one, and a crash leaves at most a temporary name that the next write
or prune removes. A write that fails removes what it wrote; one that ran out of room (a full disk or quota, a
file-size limit) is then a NoSpaceError naming the destination and about how many bytes it needs.

SHA-256 is computed here too: `write_bytes` (and the text and JSON writers) return the digest of what they wrote,
`publish(..., digest=True)` that of a finished temporary file, and `sha256_file` that of any file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import AegisError, no_space, out_of_room

TMP_PREFIX = ".tmp-"
CHUNK = 1 << 22

# The bytes a write needs, for its NoSpaceError: a number known in advance, or worked out from the bytes written
# before the write failed.
Needed = int | Callable[[int], int | None] | None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def temp_sibling(dest: Path, tag: str = "") -> Path:
    """A temporary name beside `dest` for this process: `.tmp-STEM-PID[TAG][.SUFFIX]` (the suffix kept, so a tool
    that looks at it sees the same kind of file)."""
    dest = Path(dest)
    return dest.with_name(f"{TMP_PREFIX}{dest.stem}-{os.getpid()}{tag}{dest.suffix}")


def size_of(path: Path) -> int:
    """Bytes in a file, or in every file under a directory; 0 when nothing is there."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.is_file() else 0


def remove(path: Path) -> None:
    """Removes a file or a directory tree, if there is one."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def discard(path: Path) -> None:
    """Removes a directory so that no reader ever sees part of it: renamed to a temporary name first (one step),
    then deleted; a kill halfway through the delete leaves only a temporary name."""
    doomed = temp_sibling(path, ".discarded")
    os.replace(path, doomed)
    remove(doomed)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path, digest: bool) -> str | None:
    """Flushes a file (or every file and folder under a directory) to disk; the file's SHA-256 when asked."""
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if not f.is_symlink():
                _fsync(f)
        _fsync(path)
        return None
    _fsync(path)
    return sha256_file(path) if digest else None


def publish(tmp: Path, dest: Path, digest: bool = False) -> str | None:
    """Puts the finished file or directory `tmp` at `dest` in one rename, after flushing it to disk; an older
    directory at `dest` is moved aside first and removed after. Returns the file's SHA-256 when `digest`."""
    found = _fsync_tree(Path(tmp), digest)
    _rename(Path(tmp), Path(dest))
    return found


def _rename(tmp: Path, dest: Path) -> None:
    if dest.is_dir() and not dest.is_symlink():
        old = temp_sibling(dest, ".old")
        os.replace(dest, old)
        os.replace(tmp, dest)
        remove(old)
    else:
        os.replace(tmp, dest)
    _fsync(dest.parent)


@contextlib.contextmanager
def _atomic(dest: Path, directory: bool, needed: Needed, shown: str | None, then: str) -> Iterator[Path]:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    remove(tmp)  # left by an earlier process of the same id
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        _fsync_tree(tmp, False)  # a full disk can still refuse the flush; the rename cannot fail for want of room
    except BaseException as e:
        written = size_of(tmp)
        remove(tmp)
        if isinstance(e, Exception) and not isinstance(e, AegisError) and out_of_room(e):
            bytes_needed = needed(written) if callable(needed) else needed
            raise no_space(dest, e, bytes_needed, written or None, then=then, shown=shown) from None
        raise
    _rename(tmp, dest)


def atomic_file(
    dest: Path, needed: Needed = None, shown: str | None = None, then: str = "run again"
) -> contextlib.AbstractContextManager[Path]:
    """Yields a temporary path beside `dest` for the caller to write; on success it becomes `dest` (`publish`), on
    failure it is removed. A failure for want of room is a NoSpaceError naming `dest` (or `shown`, what a temporary
    file stands for) with `needed` bytes and ending `then` (what the user does after freeing room)."""
    return _atomic(dest, False, needed, shown, then)


def atomic_dir(
    dest: Path, needed: Needed = None, shown: str | None = None, then: str = "run again"
) -> contextlib.AbstractContextManager[Path]:
    """`atomic_file` for a directory: yields a fresh empty directory beside `dest`, which replaces `dest` whole."""
    return _atomic(dest, True, needed, shown, then)


def write_bytes(dest: Path, data: bytes) -> str:
    """Writes `data` whole at `dest` (see the module's docstring); returns its SHA-256."""
    with atomic_file(dest, len(data)) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_text(dest: Path, text: str) -> str:
    return write_bytes(dest, text.encode("utf-8"))


def write_json(dest: Path, data, indent: int = 1) -> str:
    return write_text(dest, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
