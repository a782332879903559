"""What the families written as llama.cpp's llama architecture (Llama, Mistral) share: the GGUF architecture, q/k
rows interleaved for its rotary layout, its usual byte-level BPE pre-tokenizer, and LoRA on the attention
projections. A family file of that architecture builds its `Family` here and gives only what is its own."""

from aegis.families import Family

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def llama_arch(**own) -> Family:
    """A family written as llama.cpp's llama architecture; `own` holds its other fields (name, chat format, tools)."""
    return Family(gguf_arch="llama", lora_targets=ATTENTION, permute_qk=True, bpe_pre="llama-bpe", **own)
