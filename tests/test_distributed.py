"""Two processes on the gloo backend (CPU) against one: same global batch, same curve, one writer."""

import json
import shutil
import subprocess
import sys

import pytest

from aegis import checkpoint, metrics
from conftest import QUICKSTART, ROOT, train_cli

SETS = [
    "schedule.total_steps=6",
    "schedule.warmup_steps=1",
    "schedule.anneal_steps=3",
    "train.save_steps=3",
    "train.max_length=128",
    "lora.dropout=0",
]  # no dropout: the masks would differ by process count


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def two_proc(tiny_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(2, str(ROOT / "tests" / "ddp_worker.py"), str(QUICKSTART), str(run), *SETS)
    return run


@pytest.fixture(scope="module")
def one_proc(tiny_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    train_cli(run, *SETS, "train.grad_accum=2")  # the same global batch as 2 processes x 1
    return run


def test_two_processes_match_one_with_the_same_global_batch(two_proc, one_proc):
    two, one = metrics.read(two_proc), metrics.read(one_proc)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))  # written once, not per rank
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-6)  # same data, same weights
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-3, (a["step"], a["loss"], b["loss"])
        assert a["tokens"] == b["tokens"] == 256  # global tokens, aggregated over ranks
        assert a["alpha"] == b["alpha"]


def test_every_rank_ends_with_the_same_soul(two_proc):
    check = json.loads((two_proc / "rank_check.json").read_text())
    assert check["world"] == 2 and check["moved"] > 0 and check["max_diff"] == 0.0


def test_checkpoints_are_written_once_and_complete(two_proc):
    names = sorted(p.name for p in (two_proc / "checkpoints").iterdir())
    assert names == ["step_3", "step_6"]  # no leftover temporary directories from a second writer
    state = json.loads((two_proc / "final" / checkpoint.STATE).read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 2


def test_resume_on_one_process_keeps_the_global_batch(two_proc, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_proc, run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_6")
    proc = train_cli(run, *SETS, resume=True)
    assert "gradient accumulation 1 -> 2" in proc.stdout + proc.stderr
    for a, b in zip(metrics.read(two_proc)[3:], metrics.read(run)[3:]):
        assert abs(a["loss"] - b["loss"]) < 1e-3 and b["tokens"] == 256
