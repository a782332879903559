"""The chat-quality measures mean what README says they mean, and the script runs end to end on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.conversations import conversation
from train import chat_quality as cq

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, ratio",
    [
        ("こんにちは。", 1.0),  # hiragana and 。
        ("カタカナと漢字、「かぎ括弧」！？", 1.0),  # katakana, ideographs, Japanese and full-width punctuation
        ("ｶﾀｶﾅ…ー・々〆", 1.0),  # half-width katakana, ellipsis, long vowel, iteration marks
        ("OKです", 0.5),  # Latin letters count against
        ("ABCD", 0.0),
        ("480×0.45=216なので、216人です。", 1.0),  # digits and the signs of a sum are not counted
        ("７月の予定", 1.0),  # full-width digits: not counted either
        ("はい OK", 0.5),  # whitespace is not counted
        ("", 0.0),
        ("   ", 0.0),
        ("10000000", 0.0),  # nothing counted: says nothing in Japanese
        ("「I 10000000000000000000000000000", 0.5),  # the word salad of issue 12: 「 counts, I does not
        ("はい!", 2 / 3),  # an ASCII exclamation mark is not Japanese punctuation
    ],
)
def test_japanese_ratio(text, ratio):
    assert cq.japanese_ratio(text) == pytest.approx(ratio)


def test_every_reference_reply_is_japanese_by_the_definition():
    """The held-out references themselves (sums, dates and all) meet the 90 % bar the model is held to."""
    turns = cq.held_out_turns(cq.data.resolve(cq.HELD_OUT)[0])
    assert len(turns) >= 40
    assert min(cq.japanese_ratio(ref) for _, ref in turns) >= cq.JAPANESE_MIN


@pytest.mark.parametrize(
    "ids, most",
    [
        ([], 0),
        ([1, 2, 3], 0),
        ([1, 2, 3, 4], 1),
        ([1, 2, 3, 4, 1, 2, 3, 4], 2),  # twice is allowed
        ([1, 2, 3, 4] * 3, 3),  # a third time is a loop
        ([7] * 10, 7),  # overlapping runs count: 7 7 7 7 starts at 7 places
        ([1, 2, 3, 4, 5, 1, 2, 3, 9, 1, 2, 3, 4], 2),  # a 3-token run repeated is not a 4-token repeat
    ],
)
def test_most_repeated_4_token_run(ids, most):
    assert cq.most_repeated(ids) == most


def test_held_out_turns_give_the_history_before_each_reply(tmp_path):
    path = tmp_path / "chats.jsonl"
    msgs = conversation("S", "U1", "A1", "U2", "A2")
    path.write_text(json.dumps({"messages": msgs}) + "\n", encoding="utf-8")
    turns = cq.held_out_turns(path)
    assert [(len(h), h[-1]["content"], ref) for h, ref in turns] == [(2, "U1", "A1"), (4, "U2", "A2")]


def test_summary_and_targets():
    rows = [
        {"japanese": 1.0, "ended": True, "most_repeated": 1, "tokens": 40},
        {"japanese": 0.95, "ended": True, "most_repeated": 2, "tokens": 50},
        {"japanese": 0.92, "ended": True, "most_repeated": 2, "tokens": 30},
        {"japanese": 0.91, "ended": True, "most_repeated": 1, "tokens": 60},
        {"japanese": 1.0, "ended": False, "most_repeated": 2, "tokens": 96},
    ]
    result = {"summary": cq.summary(rows), "perplexity": {"ratio_to_base": 1.04}}
    assert result["summary"]["ended"] == pytest.approx(0.8)
    assert cq.targets(result) == {"japanese": True, "ended": True, "no_loops": True, "perplexity": True}
    rows[4] = {**rows[4], "most_repeated": 3, "japanese": 0.89}
    result = {"summary": cq.summary(rows), "perplexity": {"ratio_to_base": 1.06}}
    assert result["summary"]["looping"] == 1
    assert cq.targets(result) == {"japanese": False, "ended": True, "no_loops": False, "perplexity": False}


def test_the_script_runs_on_the_embedded_model(tiny_path, tmp_path):
    """Two held-out chats through the real command: replies generated, scored and written as JSON."""
    lines = cq.data.resolve(cq.HELD_OUT)[0].read_text(encoding="utf-8").splitlines()[:2]
    chats = tmp_path / "two.jsonl"
    chats.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "quality.json"
    proc = subprocess.run(
        [sys.executable, "-m", "train.chat_quality", "--data", str(chats), "--out", str(out), "--max-new-tokens", "24"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    turns = cq.held_out_turns(chats)
    assert len(result["rows"]) == result["summary"]["replies"] == len(turns)
    for row, (history, reference) in zip(result["rows"], turns):
        assert row["prompt"] == history[-1]["content"] and row["reference"] == reference
        assert 1 <= row["tokens"] <= 24
        assert row["japanese"] == pytest.approx(cq.japanese_ratio(row["reply"]))
    assert result["perplexity"]["base"]["tokens"] > 0
    assert "Japanese characters" in proc.stdout
