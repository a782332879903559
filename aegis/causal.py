"""Causal attention without a mask, for training.

Training feeds whole windows, padded on the right only, and passes no attention mask (train/loss.py,
train/graphs.py): causal attention is all it needs, and SDPA's `is_causal` runs it in its flash kernels. The one
exception is a window that keeps its documents apart (data.packing = "documents"): it brings its own 4-D mask and
position ids (aegis/packing.py), which transformers hands to this attention as they are, and SDPA runs the mask.
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

NAME = "causal_sdpa"


def use_causal_sdpa(model, max_length: int) -> bool:
    """Switch `model` (a transformers model using SDPA) to mask-free causal SDPA. Not where the model needs a mask of
    its own (a sliding window shorter than the sequences, chunked attention), nor on a transformers without the mask
    functions that let it skip the mask. Returns whether it switched."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
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
    AttentionInterface.register(NAME, sdpa_attention_forward)
    model.set_attn_implementation(NAME)
    return True
