"""What AEGIS decides about GGUF that gguf-py does not already know: which Hugging Face families it writes as which
llama.cpp architecture (and how their tensors are treated), and the --type names it offers.

Everything else is gguf-py's own data: metadata keys (gguf.Keys, through GGUFWriter's typed setters), token types
(gguf.TokenType), tensor names (gguf.get_tensor_name_map), special tokens and merges (gguf.SpecialVocab)."""

from __future__ import annotations

import gguf

from aegis import families

# HF model_type -> how it is written (aegis/families/ declares each): arch, llama.cpp's architecture; permute_qk,
# q/k rows reordered for llama.cpp's interleaved rotary pairs; longrope, LongRoPE factors written as tensors
_ARCHS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
FAMILIES = {
    f.name: {"arch": _ARCHS[f.gguf_arch], "permute_qk": f.permute_qk, "longrope": f.longrope}
    for f in families.FAMILIES.values()
}
ROPE_FACTORS_LONG = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
ROPE_FACTORS_SHORT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"


def arch_name(model_type: str) -> str:
    return gguf.MODEL_ARCH_NAMES[FAMILIES[model_type]["arch"]]


def tensor_namer(model_type: str, n_blocks: int):
    """HF tensor name -> GGUF tensor name (None for a name the architecture does not have)."""
    tmap = gguf.get_tensor_name_map(FAMILIES[model_type]["arch"], n_blocks)
    return lambda name: tmap.get_name(name, try_suffixes=(".weight", ".bias"))


# ---- output types ---------------------------------------------------------------------------------------------------
# --type -> llama.cpp's file type. The float types and the legacy block quants are written by gguf-py (PYTHON_TYPES:
# the tensor type they are written in); K-quants are made by llama.cpp's quantizer from a float GGUF (quantize.py).
_OFFERED = (
    "f32",
    "f16",
    "bf16",
    "q8_0",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
)
TYPES = {t: gguf.LlamaFileType["ALL_F32" if t == "f32" else f"MOSTLY_{t.upper()}"] for t in _OFFERED}
PYTHON_TYPES = {t: gguf.GGMLQuantizationType[t.upper()] for t in _OFFERED[:8]}
