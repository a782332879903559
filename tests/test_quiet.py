"""Commands print what matters to the user and no library notes that say nothing to them. A first run printed, on
every command: bitsandbytes' note about an optional hub-downloaded kernel package (on CPUs with AVX-512 BF16),
transformers' warning about the embedded model's LongRoPE config, and a FutureWarning that peft triggers."""

from __future__ import annotations

from conftest import train_cli
from support.commands import python_m

NOISE = ("kernels-community", "rope_parameters", "FutureWarning", "DeprecationWarning")


def test_training_and_chat_print_no_library_notes(tiny_path, tmp_path):
    run = tmp_path / "run"
    proc = train_cli(
        run,
        "schedule.total_steps=2",
        "schedule.warmup_steps=1",
        "schedule.anneal_steps=1",
        "train.max_length=64",
        "train.save_steps=2",
    )
    greedy = ["--prompt", "こんにちは", "--temperature", 0, "--max-new-tokens", 2]
    chat = python_m("train.chat", "--checkpoint", run, *greedy, timeout=300)
    assert chat.returncode == 0, chat.stderr
    for out in (proc.stdout + proc.stderr, chat.stderr):
        assert not [n for n in NOISE if n in out], out
