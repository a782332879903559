"""The GGUF names AEGIS writes, as data: metadata keys, tensor names per architecture, file types.

Kept in one table (rather than spread through the writer) so that what the file holds can be read in one place and
checked by a test with gguf's own reader. The strings are the ones llama.cpp reads."""

from __future__ import annotations

# ---- metadata keys ("{arch}" is the architecture name) -------------------------------------------------------------
KEYS = {
    "architecture": "general.architecture",
    "name": "general.name",
    "file_type": "general.file_type",
    "quantization_version": "general.quantization_version",
    "vocab_size": "{arch}.vocab_size",
    "context_length": "{arch}.context_length",
    "embedding_length": "{arch}.embedding_length",
    "feed_forward_length": "{arch}.feed_forward_length",
    "block_count": "{arch}.block_count",
    "head_count": "{arch}.attention.head_count",
    "head_count_kv": "{arch}.attention.head_count_kv",
    "rms_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "sliding_window": "{arch}.attention.sliding_window",
    "rope_dimension_count": "{arch}.rope.dimension_count",
    "rope_freq_base": "{arch}.rope.freq_base",
    "rope_scaling_type": "{arch}.rope.scaling.type",
    "rope_scaling_factor": "{arch}.rope.scaling.factor",
    "rope_attn_factor": "{arch}.rope.scaling.attn_factor",
    "rope_original_context": "{arch}.rope.scaling.original_context_length",
    "tokenizer_model": "tokenizer.ggml.model",
    "tokenizer_pre": "tokenizer.ggml.pre",
    "tokens": "tokenizer.ggml.tokens",
    "scores": "tokenizer.ggml.scores",
    "token_types": "tokenizer.ggml.token_type",
    "merges": "tokenizer.ggml.merges",
    "bos_id": "tokenizer.ggml.bos_token_id",
    "eos_id": "tokenizer.ggml.eos_token_id",
    "eot_id": "tokenizer.ggml.eot_token_id",
    "unk_id": "tokenizer.ggml.unknown_token_id",
    "pad_id": "tokenizer.ggml.padding_token_id",
    "add_bos": "tokenizer.ggml.add_bos_token",
    "add_eos": "tokenizer.ggml.add_eos_token",
    "add_space_prefix": "tokenizer.ggml.add_space_prefix",
    "chat_template": "tokenizer.chat_template",
}


def key(name: str, arch: str) -> str:
    return KEYS[name].format(arch=arch)


# ---- token types (SentencePiece's, as llama.cpp reads them) ---------------------------------------------------------
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# ---- tensors --------------------------------------------------------------------------------------------------------
# (HF name with {bid} for the block number, GGUF name). Names absent from a model are simply not written; a model
# tensor that matches no row is an error (it would be silently lost otherwise).
_COMMON = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{bid}.input_layernorm.weight", "blk.{bid}.attn_norm.weight"),
    ("model.layers.{bid}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight"),
    ("model.layers.{bid}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight"),
    ("model.layers.{bid}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight"),
]
_SPLIT_ATTENTION = [
    ("model.layers.{bid}.self_attn.q_proj.weight", "blk.{bid}.attn_q.weight"),
    ("model.layers.{bid}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight"),
    ("model.layers.{bid}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight"),
    ("model.layers.{bid}.self_attn.q_proj.bias", "blk.{bid}.attn_q.bias"),
    ("model.layers.{bid}.self_attn.k_proj.bias", "blk.{bid}.attn_k.bias"),
    ("model.layers.{bid}.self_attn.v_proj.bias", "blk.{bid}.attn_v.bias"),
    ("model.layers.{bid}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight"),
    ("model.layers.{bid}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight"),
]
# Phi-3 keeps q/k/v and gate/up fused; llama.cpp's phi3 graph splits them itself.
_PHI3 = [
    ("model.layers.{bid}.self_attn.qkv_proj.weight", "blk.{bid}.attn_qkv.weight"),
    ("model.layers.{bid}.mlp.gate_up_proj.weight", "blk.{bid}.ffn_up.weight"),
]
ROPE_FACTORS_LONG = "rope_factors_long.weight"
ROPE_FACTORS_SHORT = "rope_factors_short.weight"

# HF model_type -> how it is written.
#   arch:        llama.cpp architecture name
#   tensors:     the name table
#   permute_qk:  llama.cpp's llama graph uses interleaved rotary pairs where HF rotates halves, so q/k rows are
#                reordered for it; phi3 and qwen2 use the half-rotation (NEOX) form and are written as they are
#   longrope:    LongRoPE factors written as tensors
ARCHITECTURES = {
    "phi3": {"arch": "phi3", "tensors": _COMMON + _PHI3, "permute_qk": False, "longrope": True},
    "llama": {"arch": "llama", "tensors": _COMMON + _SPLIT_ATTENTION, "permute_qk": True, "longrope": False},
    "mistral": {"arch": "llama", "tensors": _COMMON + _SPLIT_ATTENTION, "permute_qk": True, "longrope": False},
    "qwen2": {"arch": "qwen2", "tensors": _COMMON + _SPLIT_ATTENTION, "permute_qk": False, "longrope": False},
}

# ---- output types ---------------------------------------------------------------------------------------------------
# --type -> (how it is made, GGML tensor type name or llama.cpp ftype name, general.file_type value)
#   python:  written by gguf-py (floats, and the legacy block quants it implements)
#   llama:   written as an intermediate float GGUF, then quantized by llama.cpp through llama-cpp-python
TYPES = {
    "f32": ("python", "F32", 0),
    "f16": ("python", "F16", 1),
    "bf16": ("python", "BF16", 32),
    "q8_0": ("python", "Q8_0", 7),
    "q4_0": ("python", "Q4_0", 2),
    "q4_1": ("python", "Q4_1", 3),
    "q5_0": ("python", "Q5_0", 8),
    "q5_1": ("python", "Q5_1", 9),
    "q2_k": ("llama", "LLAMA_FTYPE_MOSTLY_Q2_K", 10),
    "q3_k_s": ("llama", "LLAMA_FTYPE_MOSTLY_Q3_K_S", 11),
    "q3_k_m": ("llama", "LLAMA_FTYPE_MOSTLY_Q3_K_M", 12),
    "q3_k_l": ("llama", "LLAMA_FTYPE_MOSTLY_Q3_K_L", 13),
    "q4_k_s": ("llama", "LLAMA_FTYPE_MOSTLY_Q4_K_S", 14),
    "q4_k_m": ("llama", "LLAMA_FTYPE_MOSTLY_Q4_K_M", 15),
    "q5_k_s": ("llama", "LLAMA_FTYPE_MOSTLY_Q5_K_S", 16),
    "q5_k_m": ("llama", "LLAMA_FTYPE_MOSTLY_Q5_K_M", 17),
    "q6_k": ("llama", "LLAMA_FTYPE_MOSTLY_Q6_K", 18),
}


def tensor_map(model_type: str, n_blocks: int) -> dict[str, str]:
    """Every HF tensor name the architecture may have -> its GGUF name."""
    rows = ARCHITECTURES[model_type]["tensors"]
    out = {}
    for hf, gg in rows:
        if "{bid}" in hf:
            for b in range(n_blocks):
                out[hf.format(bid=b)] = gg.format(bid=b)
        else:
            out[hf] = gg
    return out
