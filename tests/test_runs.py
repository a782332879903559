"""A run directory's config: written whole, read back through the config loader, found from a checkpoint."""

import resource

import pytest

from aegis import atomic, runs
from aegis.config import ConfigError, build
from aegis.errors import NoSpaceError


def test_config_round_trips_and_is_found_from_its_checkpoints(tmp_path):
    cfg = build({"schedule": {"total_steps": 40, "warmup_steps": 4, "anneal_steps": 20}, "data": {"eval": ["x.txt"]}})
    assert runs.read_config(tmp_path) is None  # the run has not started
    runs.write_config(tmp_path, cfg)
    assert [p.name for p in tmp_path.iterdir()] == [runs.CONFIG]  # no temporary file left behind
    assert runs.read_config(tmp_path) == cfg
    for ckpt in (tmp_path / "final", tmp_path / "checkpoints" / "step_20"):
        ckpt.mkdir(parents=True)
        assert runs.run_of(ckpt) == tmp_path.resolve()
    assert runs.run_of(tmp_path / "a" / "b" / "alone") is None  # a checkpoint outside any run


def test_a_broken_config_names_the_file_and_key(tmp_path):
    (tmp_path / runs.CONFIG).write_text("[schedule]\ntotal_steps = 'many'\n")
    with pytest.raises(ConfigError, match=r"(?s)config\.toml.*schedule\.total_steps"):
        runs.read_config(tmp_path)


def test_a_run_file_that_finds_no_room_leaves_the_older_one(tmp_path):
    """A real file-size limit (RLIMIT_FSIZE, EFBIG) on this process for one write: the error names the file and what
    it needs, the older file is whole and no temporary file is left."""
    path = tmp_path / runs.SUMMARY
    atomic.write_text(path, "older")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(NoSpaceError) as err:
            atomic.write_text(path, "x" * 10_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(err.value).startswith(
        f"{path}: file too large for the file-size limit (ulimit -f) of 4,096 bytes; it needs about 10,000 bytes"
    )
    assert path.read_text() == "older" and [p.name for p in tmp_path.iterdir()] == [runs.SUMMARY]
