"""aegis/atomic.py, the one writer of whole files and directories: a reader sees the old version or the new one,
a failed write leaves nothing of itself, a write past the room there is names what it needs, and the digests it
returns are those of the bytes on disk. Real files and a real file-size limit (RLIMIT_FSIZE) on this process."""

from __future__ import annotations

import hashlib
import resource

import pytest

from aegis import atomic
from aegis.errors import NoSpaceError


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_written_file_is_whole_and_its_digest_is_that_of_the_file(tmp_path):
    dest = tmp_path / "sub" / "report.json"
    digest = atomic.write_json(dest, {"ratio": 1.0, "名前": "魂"})
    assert dest.read_text(encoding="utf-8") == '{\n "ratio": 1.0,\n "名前": "魂"\n}\n'
    assert digest == atomic.sha256_file(dest) == hashlib.sha256(dest.read_bytes()).hexdigest()
    assert names(dest.parent) == ["report.json"]


def test_a_directory_replaces_the_older_one_whole_and_a_failed_one_leaves_it(tmp_path):
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "old.txt").write_text("older")
    with pytest.raises(ValueError), atomic.atomic_dir(dest) as tmp:
        (tmp / "new.txt").write_text("half")
        raise ValueError("a check failed")
    assert names(tmp_path) == ["merged"] and names(dest) == ["old.txt"]
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "new.txt").write_text("newer")
    assert names(tmp_path) == ["merged"] and names(dest) == ["new.txt"]


def test_a_published_file_takes_its_name_with_its_digest(tmp_path):
    tmp = atomic.temp_sibling(tmp_path / "model.gguf", ".unchecked")
    assert tmp.name.startswith(atomic.TMP_PREFIX) and tmp.suffix == ".gguf"
    tmp.write_bytes(b"GGUF" + bytes(1000))
    digest = atomic.publish(tmp, tmp_path / "model.gguf", digest=True)
    assert digest == hashlib.sha256(b"GGUF" + bytes(1000)).hexdigest() and names(tmp_path) == ["model.gguf"]


def test_a_directory_past_the_file_size_limit_names_what_it_needs(tmp_path):
    """The bytes it needs come from the writer's estimate, given what it had written when it failed."""
    dest = tmp_path / "final"
    dest.mkdir()
    (dest / "old.bin").write_bytes(b"older")
    seen = []

    def needed(written: int) -> int:
        seen.append(written)
        return 3 * 10_000

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(NoSpaceError) as err, atomic.atomic_dir(dest, needed, then="continue with --resume") as tmp:
            (tmp / "a.bin").write_bytes(b"a" * 4000)
            (tmp / "b.bin").write_bytes(b"b" * 10_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(err.value).startswith(
        f"{dest}: file too large for the file-size limit (ulimit -f) of 4,096 bytes; it needs about 30,000 bytes"
    )
    assert str(err.value).endswith("continue with --resume")
    assert seen and seen[0] >= 4000  # what had been written before the write that failed
    assert names(tmp_path) == ["final"] and names(dest) == ["old.bin"]
