"""Packed windows that keep their documents apart: each token attends only to the tokens before it in its own
document, and its position counts from its document's start (data.packing = "documents", train/batches.py).

A window arrives with the document of each token as a [batch, length] tensor of numbers that never decrease along a
row (0 for the first document of the window, 1 for the next, ...). From it the model gets two inputs, both built on
the device with no host synchronisation and a shape fixed by the window, so a compiled block or a captured CUDA graph
(train/graphs.py, which copies the documents into a fixed buffer) takes them as it takes the token ids:
- position ids that restart at 0 where a document starts, so rotary embeddings (LongRoPE's choice of factors too,
  which transformers makes from the largest position) see each document as if it were alone;
- the attention mask. On CUDA it is a flex-attention block mask: per 128 x 128 tile of query and key positions,
  whether the tile is empty (another document, or later), full, or partial (then the documents are compared
  element by element inside the kernel). The kernel skips empty tiles and reads no [length, length] tensor, and it
  stays a fused kernel in the compiled blocks (aegis/causal.py runs it). Elsewhere (the CPU, where flex attention
  has no backward; or attention dropout, which flex attention lacks) it is an additive [batch, 1, length, length]
  mask that SDPA reads: 0 where a token may attend (same document, not later), the dtype's lowest value elsewhere,
  built once per forward (2 bytes per pair in 16 bits: 8 MiB for 16 windows of 512).
transformers hands either kind of 4-D mask to the attention as it is.
"""

from __future__ import annotations

MODES = ("auto", "documents", "concat")
KEY = "documents"  # the batch entry (train/batches.py collate) that carries the documents


def positions(documents):
    """Position ids restarting at 0 where each document starts."""
    import torch

    index = torch.arange(documents.size(-1), device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    # the index of the latest start at or before each token is its document's first token
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=-1).values
    return index - first


def mask(documents, dtype):
    """The additive attention mask of causal attention within each document, [batch, 1, length, length]."""
    import torch

    n = documents.size(-1)
    causal = torch.ones(n, n, dtype=torch.bool, device=documents.device).tril()
    allowed = (documents[:, :, None] == documents[:, None, :]) & causal
    zero = torch.zeros((), dtype=dtype, device=documents.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def block_mask(documents):
    """The flex-attention block mask of causal attention within each document (torch builds the tiles from the
    element mask on the device: no host synchronisation, fixed shapes)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_not_later(b, h, q, kv):
        return (documents[b, q] == documents[b, kv]) & (q >= kv)

    batch, length = documents.shape
    return create_block_mask(same_document_not_later, batch, None, length, length, device=documents.device)


def flex_fits(model, device) -> bool:
    """Whether the block mask serves this model on this device: the model runs the training attention that knows
    it (aegis/causal.py), flex attention trains on CUDA only, and it has no attention dropout."""
    from .causal import NAME

    config = getattr(getattr(model, "module", model), "config", None)  # DDP holds the model as .module
    return (
        device.type == "cuda"
        and getattr(config, "_attn_implementation", None) == NAME
        and not getattr(config, "attention_dropout", 0.0)
    )


def model_inputs(model, batch: dict, flex: bool | None = None) -> dict:
    """The keyword arguments that keep a batch's documents apart in `model`'s forward; none for a batch without
    documents (plain concatenation, a single sequence), which runs causal attention without a mask. `flex`: the
    block mask (True) or the additive mask (False); by default the block mask wherever it fits (flex_fits)."""
    documents = batch.get(KEY)
    if documents is None:
        return {}
    embeddings = getattr(model, "module", model).get_input_embeddings().weight  # DDP holds the model as .module
    documents = documents.to(embeddings.device, non_blocking=True)
    if flex is None:
        flex = flex_fits(model, documents.device)
    attention = block_mask(documents) if flex else mask(documents, embeddings.dtype)
    return {"position_ids": positions(documents), "attention_mask": attention}
