"""A base that ties its head to the token embeddings (here a tiny Llama with grouped-query attention, built in the
test): merge must untie before folding the soul, and the Llama family must come out of GGUF + llama.cpp intact
(its q/k rows are reordered for llama.cpp's rotary layout)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from support.training import SMALL_SHAPE

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def tied_checkpoint(tiny_path, tmp_path_factory) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from aegis import checkpoint
    from aegis.soul import Soul

    root = tmp_path_factory.mktemp("tied")
    base = root / "tiny-llama-tied"
    base.mkdir()
    for name in TOKENIZER_FILES:
        if (tiny_path / name).exists():
            shutil.copy(tiny_path / name, base / name)
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64 * -(-len(tok) // 64),
        **SMALL_SHAPE,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the init, so the logits have some spread to compare
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(base)
    tok.save_pretrained(base)
    embed = model.model.embed_tokens.weight.detach().clone()

    lora = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False),
    )
    soul = Soul(64, mix="interpolate", init="random", alpha=1.5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        soul.generators.mul_(5.0)  # a clearly non-trivial rotation
    ckpt = checkpoint.save(
        root / "ckpt",
        model=lora,
        soul=soul,
        tokenizer=tok,
        soul_meta={"step": 7, "base": str(base), "quantization": "none", "dtype": "float32"},
    )
    return {"base": base, "ckpt": ckpt, "embed": embed, "soul": soul, "root": root}


def test_tied_head_is_untied_and_folded(tied_checkpoint):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from export.merge import merge

    out = tied_checkpoint["root"] / "merged"
    report = merge(tied_checkpoint["ckpt"], out, device="cpu")
    assert report.untied_head and report.check.relative <= 1e-4 and report.check.top1_agreement == 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    weights = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" in weights
    # Embeddings keep the base's (unrotated) values; the head is the same matrix times the soul's M.
    assert torch.equal(weights["model.embed_tokens.weight"], tied_checkpoint["embed"])
    folded = tied_checkpoint["soul"].fold(tied_checkpoint["embed"])
    assert torch.allclose(weights["lm_head.weight"], folded, atol=1e-6)
    assert not torch.allclose(folded, tied_checkpoint["embed"], atol=1e-3)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()


def test_llama_family_gguf_parity(tied_checkpoint):
    import gguf

    from export.pipeline import export_gguf

    merged = tied_checkpoint["root"] / "merged"
    if not merged.exists():
        pytest.skip("needs the merge test's output")
    for t in ("f32", "q8_0"):
        path = tied_checkpoint["root"] / f"tied-{t}.gguf"
        result = export_gguf(merged, path, t, progress=False, log=lambda *_: None)
        report = result["parity"]
        assert report["passed"], report["failures"]
        if t == "f32":
            assert report["overall"]["max_abs"] < 5e-3 and report["overall"]["top1"] == 1.0
    reader = gguf.GGUFReader(str(tied_checkpoint["root"] / "tied-f32.gguf"))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    names = {t.name for t in reader.tensors}
    assert {"output.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate.weight"} <= names
    k = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    assert list(k.shape) == [64, 32]  # 2 kv heads x 16


def test_parity_catches_a_structural_mistake(tied_checkpoint, monkeypatch):
    """Written without llama.cpp's q/k row order, the same model must fail parity: the thresholds catch real
    export mistakes, not just rounding."""
    from export import names
    from export.files import ExportError
    from export.pipeline import export_gguf

    merged = tied_checkpoint["root"] / "merged"
    if not merged.exists():
        pytest.skip("needs the merge test's output")
    monkeypatch.setitem(names.FAMILIES["llama"], "permute_qk", False)
    with pytest.raises(ExportError, match="parity failed"):
        export_gguf(merged, tied_checkpoint["root"] / "wrong-q8_0.gguf", "q8_0", progress=False, log=lambda *_: None)
    report = json.loads((tied_checkpoint["root"] / "parity.json").read_text())["wrong-q8_0.gguf"]
    assert report["overall"]["top1_tie"] < 0.75 and report["overall"]["kl_mean"] > 0.01
