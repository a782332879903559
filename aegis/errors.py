"""The one base of the errors a user causes and can fix. Each message names the file, line, key or option at fault.

    AegisError
        ConfigError       aegis/config.py       a config file, a --set override, a setting this machine cannot honour
        CheckpointError   here                  a checkpoint missing, incomplete, damaged or not fitting its base
        ModelError        here                  a base model that cannot be found or does not fit what is asked of it
        NoSpaceError      here                  a write that ran out of room: a full disk or quota, a file-size limit
        DataError         train/data.py         a data source or one of its records
        ExportError       export/files.py       export's inputs, or an export check that failed
        RunError          train/rundir.py       a run directory that cannot be used: already holds a run, is in use

The CLIs catch AegisError alone and print its message on one line; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path


class AegisError(Exception):
    pass


class ModelError(AegisError):
    pass


class CheckpointError(AegisError):
    pass


class NoSpaceError(AegisError):
    pass


# ENOSPC and EDQUOT: the file system or the user's quota is full; EFBIG: a file-size limit (ulimit -f), which
# Python meets as an error because it ignores SIGXFSZ
NO_ROOM = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file-size limit (ulimit -f)",
}
# how writers that do not keep the errno say it: safetensors' Rust writer quotes the OS's text, numpy's tofile
# reports a short write
_NO_ROOM_TEXT = re.compile(r"No space left on device|Disk quota exceeded|File too large|\d+ requested and \d+ written")


def out_of_room(e: BaseException) -> bool:
    """Whether an exception from a write means the file system had no room for it."""
    if isinstance(e, OSError) and e.errno in NO_ROOM:
        return True
    return bool(_NO_ROOM_TEXT.search(str(e)))


def no_space(
    path: Path,
    e: BaseException,
    needed: int | None = None,
    written: int | None = None,
    then: str = "run again",
    shown: str | None = None,
) -> NoSpaceError:
    """The one-line error for a write at `path` that ran out of room: what the file system has free and about how
    many bytes the whole write needs (`needed`, where the writer knows it) or at least (`written` when it failed).
    Made after the partial write is removed, so the free space is what a retry would find. `shown` names the file
    in the message instead of `path` (what a temporary file stands for)."""
    path = Path(path)
    name = shown or str(path)
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    text = str(e)
    if needed:
        size = f"about {needed:,} bytes"
    elif written:
        size = f"more than the {written:,} bytes it had written"
    else:
        size = ""
    import resource  # POSIX only, like the limit

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    code = (
        e.errno
        if isinstance(e, OSError) and e.errno in NO_ROOM
        else next(
            (
                c
                for c, word in ((errno.EFBIG, "File too large"), (errno.EDQUOT, "quota"), (errno.ENOSPC, "No space"))
                if word.lower() in text.lower()
            ),
            None,
        )
    )
    if code is None:  # a short write that does not say why: the file-size limit if one is set and the disk has room
        code = errno.EFBIG if limit != resource.RLIM_INFINITY and free > max(needed or 0, 1 << 20) else errno.ENOSPC
    if code == errno.EFBIG:
        what = NO_ROOM[code] + (f" of {limit:,} bytes" if limit != resource.RLIM_INFINITY else "")
        need = f"; it needs {size}" if size else ""
        return NoSpaceError(f"{name}: {what}{need}; nothing of it was kept, raise the limit and {then}")
    room = f"{free:,} bytes free"
    if size:
        short = f", {needed - free:,} bytes short" if needed and needed > free else ""
        room = f"it needs {size} and {free:,} are free{short}"
    return NoSpaceError(f"{name}: {NO_ROOM[code]}: {room}; nothing of it was kept, free some space and {then}")
