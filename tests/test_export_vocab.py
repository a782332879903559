"""llama.cpp strips the whitespace after special tokens exactly when general.name contains "phi3" (Phi-3's own
tokenizer does that; the embedded one does not). The GGUF's name must follow what the HF tokenizer does, or the chat
template tokenizes differently: checked both ways with llama.cpp's tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest


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
    shutil.copytree(tiny_path, model)
    if rstrip:  # make it behave like Phi-3's tokenizer: turn markers swallow the newline after them
        path = model / "tokenizer.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        for t in data["added_tokens"]:
            if t["content"].startswith("<|") and t["content"] != "<|endoftext|>":
                t["rstrip"] = True
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    # A name that says phi-3 either way: it must be kept only when the tokenizer strips.
    result = write_gguf(model, tmp_path / "m.gguf", "f16", name="Tiny-Phi-3-test", progress=False,
                        log=lambda *_: None)
    name, parity = _template_parity(tmp_path / "m.gguf", model)
    assert ("phi-3" in name.lower() or "phi3" in name.lower()) == rstrip, name
    assert any("general.name" in n for n in result.notes) != rstrip  # renamed only where it had to be
    assert parity["ok"], parity
