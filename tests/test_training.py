"""End to end: `python -m train` on the embedded model with real 4-bit layers, checkpoints, kill and resume."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from aegis import checkpoint, manifest, metrics
from aegis.schedule import Schedule, alpha_for_step, gate
from conftest import QUICKSTART, ROOT, SHORT, train_cli

FIELDS = {
    "step",
    "loss",
    "lr",
    "alpha",
    "gate",
    "phase",
    "ortho_error",
    "det_min",
    "rotation_norm",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "elapsed_s",
}


def test_metrics_follow_the_schedule(short_run):
    recs = metrics.read(short_run)
    assert [r["step"] for r in recs] == list(range(1, 13))
    sched = Schedule(total_steps=12, warmup_steps=3, anneal_steps=6)
    for r in recs:
        assert FIELDS <= r.keys()
        assert r["alpha"] == pytest.approx(alpha_for_step(r["step"], sched), abs=1e-6)
        assert r["gate"] == pytest.approx(gate(r["alpha"]), abs=1e-6)
        assert r["ortho_error"] < 1e-5 and abs(r["det_min"] - 1) < 1e-5
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0
    assert [r["phase"] for r in recs][:4] == ["chaos"] * 4 and recs[-1]["phase"] == "golden"
    assert recs[-1]["gate"] == pytest.approx(0.8345, abs=1e-4)
    assert recs[-1]["rotation_norm"] > recs[0]["rotation_norm"]  # the structure forms


def test_run_directory_layout(short_run):
    assert (short_run / "config.toml").is_file() and (short_run / "summary.json").is_file()
    steps = [p.name for p in checkpoint.list_checkpoints(short_run)]
    assert steps == ["step_6", "step_12"]
    for ckpt in (short_run / "checkpoints" / "step_6", short_run / "final"):
        assert checkpoint.is_complete(ckpt, resumable=True)
        assert (ckpt / "tokenizer_config.json").is_file()
        tensors, meta = checkpoint.read_soul(ckpt)
        assert meta["hidden_size"] == 256 and meta["mix"] == "interpolate" and meta["base"] == "embedded"
        assert meta["format_version"] == manifest.FORMAT_VERSION and "schedule" in meta
    _, meta = checkpoint.read_soul(short_run / "final")
    assert meta["step"] == 12 and meta["gate"] == pytest.approx(0.8345, abs=1e-4)
    assert not list(short_run.rglob("*.bin")) and not list(short_run.rglob("*.pt"))  # no pickles anywhere


def test_adapter_loads_with_plain_peft(short_run, tiny_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    model = PeftModel.from_pretrained(base, short_run / "final")
    trained = checkpoint.adapter_weights(short_run / "final")
    assert len(trained) == 2 * 2 * base.config.num_hidden_layers  # A and B on qkv_proj and o_proj per layer
    b = model.base_model.model.model.layers[0].self_attn.qkv_proj.lora_B["default"].weight
    assert b.abs().sum() > 0  # really trained, not the zero init


def test_resume_reproduces_the_uninterrupted_curve(short_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_12")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 99.0}\n{"step": 8, "lo')  # records after the checkpoint + a torn line
    proc = train_cli(run, *SHORT, resume=True)
    assert "resumed from" in proc.stdout + proc.stderr
    full, resumed = metrics.read(short_run), metrics.read(run)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(full[6:], resumed[6:]):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        assert a["alpha"] == b["alpha"] and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    a, b = checkpoint.adapter_weights(short_run / "final"), checkpoint.adapter_weights(run / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_interrupted_save_leaves_the_last_complete_checkpoint(short_run, tmp_path):
    """A save interrupted before its rename removes its temporary directory; the newest complete checkpoint stays.
    (A kill leaves the temporary directory, which no reader takes for complete: the SIGKILL test below.)"""
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    shutil.rmtree(run / "final")
    from aegis.loading import load_checkpoint

    model, soul, tok, _ = load_checkpoint(run / "checkpoints" / "step_12")

    def die(tmp):
        assert (tmp / checkpoint.SOUL).exists()
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(
            run / "checkpoints" / "step_18",
            model=model,
            soul=soul,
            tokenizer=tok,
            soul_meta={"step": 18},
            before_commit=die,
        )
    assert not (run / "checkpoints" / "step_18").exists()
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert checkpoint.latest(run).name == "step_12"


def test_sigkill_at_any_moment_never_leaves_a_bad_checkpoint(tiny_path, tmp_path):
    run = tmp_path / "run"
    sets = [
        "train.save_steps=1",
        "train.max_length=64",
        "train.keep_last=3",
        "schedule.total_steps=60",
        "schedule.warmup_steps=5",
        "schedule.anneal_steps=20",
    ]
    cmd = [sys.executable, "-m", "train", "--config", str(QUICKSTART), "--run-dir", str(run), "--no-progress"]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and max(map(checkpoint.step_of, checkpoint.list_checkpoints(run)), default=0) < 4:
        time.sleep(0.05)
    time.sleep(0.37)  # somewhere inside a later save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = run / "checkpoints"
    for d in root.iterdir():
        if not d.name.startswith(checkpoint.TMP_PREFIX):
            assert checkpoint.is_complete(d, resumable=True), d
            json.loads((d / checkpoint.STATE).read_text())
            checkpoint.read_soul(d)
    last = checkpoint.latest(run)
    assert last is not None and checkpoint.step_of(last) >= 4
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    train_cli(run, *sets, resume=True)
    assert checkpoint.is_complete(run / "final", resumable=True)
    assert [r["step"] for r in metrics.read(run)] == list(range(1, 61))


def test_keep_last_prunes_old_checkpoints(tiny_path, tmp_path):
    run = tmp_path / "run"
    train_cli(
        run,
        "schedule.total_steps=6",
        "schedule.warmup_steps=1",
        "schedule.anneal_steps=3",
        "train.save_steps=1",
        "train.keep_last=2",
        "train.max_length=64",
    )
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_5", "step_6"]


def test_bad_config_and_bad_data_stop_before_training(tiny_path, tmp_path):
    bad = train_cli(tmp_path / "r1", "lora.r=0", "soul.mix=blend", check=False)
    assert bad.returncode == 2 and "lora.r: must be > 0" in bad.stderr and "soul.mix" in bad.stderr
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "よい行"}\n{"messages": [{"role": "user", "content": 3}]}\n', encoding="utf-8")
    bad = train_cli(tmp_path / "r2", f'data.train=["{rows}"]', check=False)
    assert bad.returncode == 2 and f"{rows}:2: messages[0].content must be a string" in bad.stderr
    assert not (tmp_path / "r2" / "metrics.jsonl").exists()


def test_a_split_batch_trains_the_same_as_the_whole_batch(tiny_path, tmp_path):
    """A memory budget the batch of 4 does not fit makes the plan run it as 2 micro-batches of 2 in the same update:
    the loss is normalised over the whole update, so the curve is the same."""
    common = [
        "schedule.total_steps=4",
        "schedule.warmup_steps=1",
        "schedule.anneal_steps=2",
        "train.save_steps=4",
        "train.max_length=128",
        "train.batch_size=4",
        "lora.dropout=0.0",
        "model.gradient_checkpointing=false",
    ]
    whole = train_cli(tmp_path / "whole", *common)
    split = train_cli(tmp_path / "split", *common, "train.memory_budget_gib=0.05")
    assert "micro-batches" not in whole.stdout
    assert "each batch of 4 runs as 2 micro-batches of 2" in split.stdout
    a, b = metrics.read(tmp_path / "whole"), metrics.read(tmp_path / "split")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_learned_alpha_follows_the_schedule_then_trains(tiny_path, tmp_path):
    """soul.alpha_mode = learned: the schedule owns α through the anneal (its gradient is dropped), then AdamW moves
    it."""
    train_cli(tmp_path / "run", *SHORT, "soul.alpha_mode=learned")
    recs = metrics.read(tmp_path / "run")
    sched = Schedule(total_steps=12, warmup_steps=3, anneal_steps=6)
    for r in recs[:9]:
        assert r["alpha"] == pytest.approx(alpha_for_step(r["step"], sched), abs=1e-6)
    free = [r["alpha"] for r in recs[9:]]
    assert all(abs(a - sched.target_alpha) > 1e-5 for a in free) and len(set(free)) == 3
