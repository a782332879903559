"""Causal attention without a mask, for training.

Training feeds whole windows, padded on the right only, and passes no attention mask (train/loss.py,
train/graphs.py): causal attention is all it needs, and SDPA's `is_causal` runs it in its flash kernels. The one
exception is a window that keeps its documents apart (data.packing = "documents"): it brings its own 4-D mask and
position ids (aegis/packing.py), which transformers hands to this attention as they are: flex attention runs a block
mask, SDPA an additive mask.
transformers would still prepare a mask on every forward: it looks for packed sequences in the position ids, which
reads a value on the host (a synchronisation per forward), and while a CUDA graph is being captured it takes the
capture for tracing, skips that check and builds the full T x T mask instead, so that a captured step would run a
masked attention and a compiled attention block, compiled without a mask, would compile again inside the capture.
SDPA registered under a name of its own, with no mask function, makes the model skip mask creation altogether
(transformers' masking_utils returns no mask for an implementation it has no mask function for). Only training
builds use it (aegis/loading.py build); everything that reads a checkpoint loads the base again with
transformers' own attention.
"""

from __future__ import annotations

import functools

NAME = "causal_sdpa"


@functools.cache
def _compiled_flex():
    """flex attention compiled once, for calls from outside a compiled block."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention, or flex attention for a block mask (aegis/packing.py). Flex attention is a
    fused kernel only when compiled: inside a compiled block it is traced with the block; called outside one, it
    runs its compiled self."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    if dropout:
        raise ValueError("flex attention has no dropout: the block mask is for models without attention dropout")
    run = flex_attention if torch.compiler.is_compiling() or query.device.type == "cpu" else _compiled_flex()
    groups = query.shape[1] // key.shape[1]
    out = run(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def use_causal_sdpa(model, max_length: int) -> bool:
    """Switch `model` (a transformers model using SDPA) to mask-free causal SDPA. Not where the model needs a mask of
    its own (a sliding window shorter than the sequences, chunked attention), nor on a transformers without the mask
    functions that let it skip the mask. Returns whether it switched."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: F401 - what skips the mask
    except ImportError:
        return False
    window = getattr(model.config, "sliding_window", None)
    if (
        model.config._attn_implementation != "sdpa"
        or (window is not None and window < max_length)
        or getattr(model.config, "attention_chunk_size", None)
        or not hasattr(model, "set_attn_implementation")
    ):
        return False
    AttentionInterface.register(NAME, attention)
    model.set_attn_implementation(NAME)
    return True
