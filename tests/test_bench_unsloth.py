"""The Unsloth bench's CPU-side parts: the llamafied copy computes what the Phi-3 checkpoint computes (short and long
rope factors), the row checks see checkpointing and dropout as they are, and the table names the ratio."""

from __future__ import annotations

import json

import pytest
import torch

from bench import llamafy, train_unsloth


def tiny_phi3(path):
    from transformers import Phi3ForCausalLM

    from aegis.tiny import phi3_config, shape
    from bench.common import ramp_factors

    arch = shape(64, 96, 2, 8, 4, vocab_size=32064, max_position_embeddings=256, original_max_position_embeddings=16)
    cfg = phi3_config(arch, ramp_factors)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def lora_check(model, dropout: float) -> tuple:
    """(the model with LoRA (r 4, `dropout`) on qkv_proj and o_proj, a random 12-token batch, train_unsloth.check
    of the model with train_unsloth.forwards of both, as the bench merges them after its rows)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["qkv_proj", "o_proj"])
    model = get_peft_model(model, lora)
    model.train()
    batch = {"input_ids": torch.randint(0, 32064, (1, 12)), "attention_mask": torch.ones(1, 12, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    return model, batch, train_unsloth.check(model, dropout) | train_unsloth.forwards(model, batch)


def test_llamafied_copy_gives_the_same_logits(tmp_path):
    from transformers import LlamaForCausalLM

    phi3 = tiny_phi3(tmp_path / "phi3")
    llamafy.convert(tmp_path / "phi3", tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    names = {n for n, _ in llama.named_parameters()}
    assert "model.layers.0.self_attn.k_proj.weight" in names and "model.layers.0.mlp.up_proj.weight" in names
    assert llama.model.layers[0].self_attn.k_proj.weight.shape[0] == 4 * 8  # grouped kv heads split correctly
    for length in (10, 40):  # 40 > original_max_position_embeddings: the long factors
        ids = torch.randint(0, 32064, (2, length))
        with torch.no_grad():
            torch.testing.assert_close(llama(ids).logits, phi3(ids).logits, atol=1e-5, rtol=0)


def test_llamafy_refuses_a_rope_it_cannot_carry():
    with pytest.raises(ValueError, match="yarn"):
        llamafy.llama_config(
            {"num_attention_heads": 8, "hidden_size": 64, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
        )


@pytest.mark.parametrize("ckpt", [True, False])
def test_checks_see_checkpointing_and_dropout(tmp_path, ckpt):
    model = tiny_phi3(tmp_path / "m")
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, batch, out = lora_check(model, 0.05)
    assert out["training"] and out["dropout_ok"] and out["lora_targets"] == ["o_proj", "qkv_proj"]
    assert out["layer_forwards_per_step"] == (2.0 if ckpt else 1.0)
    assert out["checkpointing_seen"] is ckpt
    assert not out["four_bit_ok"] and not out["ok"]  # no 4-bit layers here, and the check says so
    assert not train_unsloth.check(model, 0.0)["dropout_ok"]
    model.eval()
    assert not train_unsloth.check(model, 0.05)["training"]


def test_table_names_unsloths_best_row_and_the_ratio(tmp_path):
    def row(which, setting, tps, peak, batch=1, **kw):
        return dict(
            which=which,
            setting=setting,
            batch=batch,
            length=512,
            tokens_per_s=tps,
            step_s=0.1,
            peak_gib=peak,
            losses=[10.4, 10.3],
            loss_last5=10.3,
            checkpointing="unsloth",
            **kw,
        )

    ours = {"card": "H200", "date": "2026-12-07", "rows": [row("ours", "seed", 20000.0, 9.1)]}
    uns = {
        "rows": [
            row("unsloth llama dropout 0", "seed", 8000.0, 5.0, checks_ok=True),
            row("unsloth fused dropout 0", "seed", 9000.0, 12.5, checks_ok=True),
            row("unsloth llama dropout 0.05", "seed", 6000.0, 5.0, checks_ok=False),
        ],
        "longest_within_budget": {"unsloth llama dropout 0": 65536},
    }
    (tmp_path / "a.json").write_text(json.dumps(ours))
    (tmp_path / "b.json").write_text(json.dumps(uns))
    text = train_unsloth.table([ours, uns])
    assert "**2.50×**" in text  # 9 000 is over 12 GiB, so 8 000 is Unsloth's best within the budget
    assert "12.50 (over)" in text and "FAILED" in text and "unsloth llama dropout 0 65536" in text


@pytest.mark.parametrize("per_token_gib, longest", [(1e-4, 98304), (5e-5, 131072), (4e-4, 24576)])
def test_long_search_finds_the_longest_length_within_budget(tmp_path, monkeypatch, per_token_gib, longest):
    """Peak memory linear in length (as measured rows are): the search lands on the longest multiple it tries."""
    runner, results, tried = _runner(
        tmp_path, monkeypatch, peak=lambda b, n: 2.0 + per_token_gib * n, tps=lambda b, n: 5000.0, long_warmup=1
    )
    runner.long(None, {}, {"which": "u"})
    assert results["longest_within_budget"]["u"] == longest
    assert len(tried) <= 5 and all(n % 4096 == 0 for _, n in tried)
    assert json.loads((tmp_path / "u.json").read_text())["longest_within_budget"]["u"] == longest


def _runner(tmp_path, monkeypatch, peak, tps, **over):
    """A Runner whose rows are computed, not trained: peak(batch, length) GiB and tps(batch, length) tokens/s."""
    import argparse

    import bench.train_throughput as tt

    tried = []

    def fake_row(model, batches, warmup, init):
        b, n = batches[0]
        tried.append((b, n))
        return {"tokens_per_s": tps(b, n), "step_s": 1.0, "peak_gib": peak(b, n), "losses": [10.0], "loss_last5": 10.0}

    monkeypatch.setattr(train_unsloth, "train_row", fake_row)
    monkeypatch.setattr(tt, "windows", lambda snap, steps, batch, length, repeat=1: [(batch, length)])
    monkeypatch.setattr(tt, "corpus_repeat", lambda snap, n, length: 1)
    args = argparse.Namespace(
        **{
            **dict(
                max_long=131072,
                budget_gib=12.0,
                long_steps=1,
                long_warmup=0,
                long_start=16384,
                deadline=0.0,
                row_reserve_s=15.0,
                tp_batches=[16, 24, 32],
                steps=5,
                warmup=3,
                out=tmp_path / "u.json",
            ),
            **over,
        }
    )
    results = {"rows": []}
    return train_unsloth.Runner(args, results, tmp_path), results, tried


def test_throughput_search_stops_at_the_budget_and_marks_the_fastest(tmp_path, monkeypatch):
    runner, results, tried = _runner(tmp_path, monkeypatch, peak=lambda b, n: 3 + 0.4 * b, tps=lambda b, n: 1000 * b)
    runner.throughput(None, {}, {"which": "u"})
    assert [b for b, _ in tried] == [16, 24]  # 24 x 512 needs 12.6 GiB: over, so 32 is never tried
    best = [r for r in results["rows"] if r.get("best_within_budget")]
    assert [r["batch"] for r in best] == [16]
    runner, results, tried = _runner(
        tmp_path, monkeypatch, peak=lambda b, n: 13.0 if b >= 16 else 5.0, tps=lambda b, n: 1000.0
    )
    runner.throughput(None, {}, {"which": "u"})
    assert [b for b, _ in tried] == [16, 8]  # the first over the budget: half of it


def test_a_long_search_cut_by_the_deadline_says_so(tmp_path, monkeypatch):
    import time

    runner, results, tried = _runner(
        tmp_path, monkeypatch, peak=lambda b, n: 2 + 5e-5 * n, tps=lambda b, n: 16384 / 30, deadline=time.time() + 100
    )
    with pytest.raises(train_unsloth.Deadline):
        runner.long(None, {}, {"which": "u"})  # 16 384 takes 30 s by its own speed, 32 768 would need ~135
    assert [n for _, n in tried] == [16384]
    assert results["longest_within_budget"] == {"u": 16384} and results["long_search_cut_short"] == ["u"]
    assert "search cut short" in train_unsloth.table([results])


def test_checks_count_the_4bit_base_layers(tmp_path):
    from transformers import BitsAndBytesConfig, Phi3ForCausalLM

    tiny_phi3(tmp_path / "m")
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = Phi3ForCausalLM.from_pretrained(tmp_path / "m", quantization_config=q, device_map="cpu")
    _, _, out = lora_check(model, 0.0)
    # qkv, o, gate_up, down in each of 2 layers: PEFT's wrappers of the same name are not counted again
    assert out["linear4bit_layers"] == 8 and out["quant_types"] == ["nf4"] and out["double_quant"] == [True]
    assert out["four_bit_ok"] and out["dropout_ok"] and out["lora_dropout_p"] == [0.0]
    assert out["ok"] and not out["checkpointing_seen"]  # what the model tells holds; the count sees no checkpointing
