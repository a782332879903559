"""Packed windows that keep their documents apart: each token attends only to the tokens before it in its own
document, and its position counts from its document's start (data.packing = "documents", train/batches.py).

A window arrives with the document of each token as a [batch, length] tensor of numbers that never decrease along a
row (0 for the first document of the window, 1 for the next, ...). From it the model gets two inputs, both built on
the device with no host synchronisation and a shape fixed by the window, so a compiled block or a captured CUDA graph
(train/graphs.py, which copies the documents into a fixed buffer) takes them as it takes the token ids:
- position ids that restart at 0 where a document starts, so rotary embeddings (LongRoPE's choice of factors too,
  which transformers makes from the largest position) see each document as if it were alone;
- an additive [batch, 1, length, length] mask: 0 where a token may attend (same document, not later), the dtype's
  lowest value elsewhere. transformers passes a 4-D mask to the attention as it is, so the mask-free SDPA of training
  builds (aegis/causal.py) runs it; it is built once per forward and every layer reads the same tensor (2 bytes per
  pair in 16 bits: 8 MiB for 16 windows of 512).
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


def model_inputs(model, batch: dict) -> dict:
    """The keyword arguments that keep a batch's documents apart in `model`'s forward; none for a batch without
    documents (plain concatenation, a single sequence), which runs causal attention without a mask."""
    documents = batch.get(KEY)
    if documents is None:
        return {}
    embeddings = getattr(model, "module", model).get_input_embeddings().weight  # DDP holds the model as .module
    documents = documents.to(embeddings.device, non_blocking=True)
    return {"position_ids": positions(documents), "attention_mask": mask(documents, embeddings.dtype)}
