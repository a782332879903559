"""Held-out evaluation of a real checkpoint; the base's figures are checked against a direct computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from aegis.tiny import corpus_path
from support.commands import python_m
from train import eval as ev, monitor_state

EVAL_DATA = ["embedded:prose_eval.txt"]


@pytest.fixture(scope="module")
def result(short_run) -> dict:
    return ev.evaluate(short_run / "final", EVAL_DATA)


def direct_base_loss(ckpt: Path, max_length: int) -> tuple[float, int]:
    """Token-weighted loss of the bare base (4-bit as trained) on prose_eval.txt, computed here from scratch:
    paragraphs split at blank lines, each tokenized + EOS, cut into max_length windows, log-softmax by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from aegis.checkpoint import read_soul
    from aegis.loading import resolve_base

    meta = read_soul(ckpt)[1]
    assert meta["quantization"] == "nf4"
    base = resolve_base(meta["base"])
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(
        base,
        dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.uint8,
        ),
    ).eval()
    text = corpus_path("prose_eval.txt").read_text(encoding="utf-8")
    total, count = 0.0, 0
    with torch.no_grad():
        for para in (p.strip() for p in text.split("\n\n") if p.strip()):
            ids = tok(para, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for i in range(0, len(ids), max_length):
                w = torch.tensor(ids[i : i + max_length])
                if len(w) < 2:
                    continue
                logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), dim=-1)
                total -= float(logp[:-1].gather(1, w[1:, None]).sum())
                count += len(w) - 1
    return total / count, count


def test_base_equals_direct_computation(short_run, result):
    loss, count = direct_base_loss(short_run / "final", result["max_length"])
    base = result["results"]["base"]
    assert base["tokens"] == count
    assert base["loss"] == pytest.approx(loss, rel=1e-4)
    assert base["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_rows_separate_lora_and_soul(short_run, result):
    res = result["results"]
    assert set(res) == {"checkpoint", "gate_shut", "base"}
    assert result["gate"] == pytest.approx(0.8345, abs=1e-4)
    assert result["step"] == monitor_state.read_schedule(short_run).total_steps
    assert len({res["checkpoint"]["tokens"], res["gate_shut"]["tokens"], res["base"]["tokens"]}) == 1
    # LoRA moved the model off the base, and the soul (gate 0.83, trained rotation) moved it again.
    assert res["gate_shut"]["loss"] != pytest.approx(res["base"]["loss"], abs=1e-6)
    assert res["checkpoint"]["loss"] != pytest.approx(res["gate_shut"]["loss"], abs=1e-6)
    for variant in ("checkpoint", "gate_shut"):
        assert res[variant]["ratio_to_base"] == pytest.approx(res[variant]["perplexity"] / res["base"]["perplexity"])


def test_gate_shut_restores_alpha(short_run):
    from aegis.loading import load_checkpoint

    _, soul, _, _ = load_checkpoint(short_run / "final")
    before = float(soul.alpha)
    with ev.gate_shut(soul):
        assert float(soul.gate()) == 0.0
    assert float(soul.alpha) == before


def test_cli_json_defaults_to_the_runs_eval_data(short_run, result, tmp_path):
    out = tmp_path / "eval.json"
    proc = python_m("train.eval", "--checkpoint", short_run / "final", "--base", "--json", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["data"] == EVAL_DATA  # from the run's config.toml (quickstart's data.eval)
    assert list(printed["results"]) == ["base"]
    assert printed["results"]["base"]["loss"] == pytest.approx(result["results"]["base"]["loss"], rel=1e-6)


def test_cli_errors(short_run, tmp_path):
    proc = python_m("train.eval", "--checkpoint", tmp_path / "nope", timeout=120)
    assert proc.returncode == 2 and "no such checkpoint directory" in proc.stderr
    missing = tmp_path / "missing.txt"
    proc = python_m("train.eval", "--checkpoint", short_run / "final", "--data", missing, timeout=120)
    assert proc.returncode == 2 and "missing.txt: no such file" in proc.stderr
