"""llama.cpp strips the whitespace after special tokens exactly when general.name contains "phi3" (Phi-3's own
tokenizer does that; the embedded one does not). The GGUF's name must follow what the HF tokenizer does, or the chat
template tokenizes differently: checked both ways with llama.cpp's tokenizer."""

from __future__ import annotations

import shutil

import pytest

from support.tokenizers import copy_with_stripping_markers
from support.training import SMALL_SHAPE


def _template_parity(gguf_path, model_dir):
    import llama_cpp
    from transformers import AutoTokenizer

    from export import parity

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, verbose=False, vocab_only=True)
    return llm.metadata["general.name"], parity.template_parity(llm, AutoTokenizer.from_pretrained(model_dir))


@pytest.mark.parametrize("rstrip", [False, True])
def test_name_follows_the_tokenizers_whitespace_rule(tiny_path, tmp_path, rstrip):
    from export.to_gguf import write_gguf

    model = tmp_path / "model"
    if rstrip:  # make it behave like Phi-3's tokenizer: turn markers swallow the newline after them
        copy_with_stripping_markers(tiny_path, model)
    else:
        shutil.copytree(tiny_path, model)
    # A name that says phi-3 either way: it must be kept only when the tokenizer strips.
    result = write_gguf(model, tmp_path / "m.gguf", "f16", name="Tiny-Phi-3-test", progress=False, log=lambda *_: None)
    name, parity = _template_parity(tmp_path / "m.gguf", model)
    assert ("phi-3" in name.lower() or "phi3" in name.lower()) == rstrip, name
    assert any("general.name" in n for n in result.notes) != rstrip  # renamed only where it had to be
    assert parity["ok"], parity


def test_qwen2_with_byte_level_bpe(tmp_path):
    """The other vocabulary kind: a byte-level BPE tokenizer (as Qwen and Llama 3 use) on a tiny Qwen2 with q/k/v
    biases and grouped-query attention, trained and built here."""
    import gguf
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from aegis.tiny import corpus_path
    from export.pipeline import export_gguf

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [corpus_path("prose_train_a.txt").read_text(encoding="utf-8")],
        trainers.BpeTrainer(
            vocab_size=1000,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    )
    model_dir = tmp_path / "qwen"
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=1024,
            **SMALL_SHAPE,
            tie_word_embeddings=False,
            eos_token_id=tok.eos_token_id,
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(model_dir)
    result = export_gguf(model_dir, tmp_path / "qwen-f32.gguf", "f32", progress=False, log=lambda *_: None)
    report = result["parity"]
    assert report["passed"] and report["template"]["ok"], report["failures"]
    assert report["overall"]["max_abs"] < 1e-3
    reader = gguf.GGUFReader(str(tmp_path / "qwen-f32.gguf"))
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "qwen2"
    assert "blk.0.attn_q.bias" in {t.name for t in reader.tensors}
