"""Chat with a real checkpoint of the embedded model: --prompt, streaming, history, commands, bad checkpoints."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aegis import manifest
from train import chat as chat_mod

PROMPT = "こんにちは。今日はどんなことを手伝ってくれますか。"

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def loaded(short_run):
    from aegis.loading import load_checkpoint

    return load_checkpoint(short_run / "final")


def greedy_reference(model, tokenizer, messages: list[dict], max_new: int) -> str:
    """Greedy decoding by hand (full forward each token, argmax), independent of generate() and the streamer."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    stop = set(chat_mod.stop_ids(model, tokenizer))
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def run_chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.chat", *args], cwd=REPO, capture_output=True, text=True, input=stdin, timeout=300
    )


def test_stop_ids_include_end_of_turn(loaded):
    model, _, tok, _ = loaded
    ids = chat_mod.stop_ids(model, tok)
    assert tok.convert_tokens_to_ids("<|end|>") in ids
    assert tok.convert_tokens_to_ids("<|endoftext|>") in ids


def test_prompt_answers_once_from_the_checkpoint(short_run, loaded):
    proc = run_chat(
        "--checkpoint",
        str(short_run / "final"),
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--seed",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"step {loaded[3]['step']}" in proc.stderr and "gate 0.8345" in proc.stderr
    answer = proc.stdout.strip()
    assert answer, "no reply was printed"
    model, _, tok, _ = loaded
    assert answer == greedy_reference(model, tok, [{"role": "user", "content": PROMPT}], 24)


def test_history_reset_and_system(loaded):
    model, _, tok, _ = loaded
    chat = chat_mod.Chat(model, tok, temperature=0, max_new_tokens=8)
    inp = io.StringIO(
        f"{PROMPT}\nありがとう。\n/system あなたは猫です。\nこんにちは\n/reset\n/bogus\n/exit\nnot read\n"
    )
    out = io.StringIO()
    chat_mod.loop(chat, inp, out)
    text = out.getvalue()
    assert "(system prompt set; conversation cleared)" in text
    assert "(conversation cleared)" in text and "unknown command /bogus" in text
    assert chat.history == [] and chat.system == "あなたは猫です。"
    # the second answer was generated with the first exchange in context
    chat2 = chat_mod.Chat(model, tok, temperature=0, max_new_tokens=8)
    first = chat2.reply(PROMPT, io.StringIO())
    chat2.reply("ありがとう。", io.StringIO())
    assert [m["role"] for m in chat2.messages()] == ["user", "assistant", "user", "assistant"]
    assert chat2.messages()[1]["content"] == first
    chat2.system = "あなたは猫です。"
    assert chat2.messages()[0] == {"role": "system", "content": "あなたは猫です。"}


def test_sampling_with_a_seed_is_reproducible(loaded):
    from transformers import set_seed

    model, _, tok, _ = loaded
    replies = []
    for _ in range(2):
        set_seed(7)  # what --seed does
        chat = chat_mod.Chat(model, tok, temperature=1.0, top_p=0.95, max_new_tokens=12)
        replies.append(chat.reply(PROMPT, io.StringIO()))
    assert replies[0] == replies[1] and replies[0]


def _rewrite_soul(ckpt: Path, **meta_changes) -> None:
    path = ckpt / "soul.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in meta_changes.items():
        meta[k] = json.dumps(v)
    if "hidden_size" in meta_changes:
        tensors["generators"] = torch.zeros(meta_changes["hidden_size"] // 8, 28)
    save_file(tensors, str(path), metadata=meta)
    manifest.write_manifest(ckpt)  # a well-formed checkpoint of another shape, not a damaged one


def test_mismatched_soul_is_a_clear_error(short_run, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(short_run / "final", bad)
    _rewrite_soul(bad, hidden_size=64)  # the embedded model has 256
    proc = run_chat("--checkpoint", str(bad), "--prompt", PROMPT)
    assert proc.returncode != 0
    assert "soul.safetensors" in proc.stderr and "hidden size 64" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_soul_of_another_format_version_is_refused(short_run, tmp_path):
    from aegis.checkpoint import CheckpointError
    from aegis.loading import load_checkpoint

    bad = tmp_path / "bad"
    shutil.copytree(short_run / "final", bad)
    _rewrite_soul(bad, format_version=99)
    with pytest.raises(CheckpointError, match=r"soul\.safetensors: soul format version 99"):
        load_checkpoint(bad)


def test_bad_arguments(short_run):
    proc = run_chat("--checkpoint", str(short_run / "final"), "--top-p", "0")
    assert proc.returncode == 2 and "--top-p" in proc.stderr


def test_a_run_directory_stands_for_its_final_checkpoint(short_run, tmp_path):
    assert chat_mod.checkpoint_dir(short_run) == short_run / "final"
    steps = tmp_path / "run"  # a run stopped before final/: its newest step checkpoint
    shutil.copytree(short_run / "checkpoints", steps / "checkpoints")
    newest = max((steps / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    assert chat_mod.checkpoint_dir(steps) == newest
    proc = run_chat("--checkpoint", str(short_run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "4")
    assert proc.returncode == 0 and f"loaded {short_run / 'final'} (step" in proc.stderr, proc.stderr
    empty = tmp_path / "empty"  # a run directory with no checkpoint yet, and a directory that is neither
    empty.mkdir()
    (empty / "config.toml").write_text("")
    proc = run_chat("--checkpoint", str(empty), "--prompt", PROMPT)
    assert proc.returncode == 2 and "has no complete checkpoint yet" in proc.stderr, proc.stderr
    proc = run_chat("--checkpoint", str(tmp_path), "--prompt", PROMPT)
    assert proc.returncode == 2 and "pass RUN_DIR, RUN_DIR/final or RUN_DIR/checkpoints/step_N" in proc.stderr
