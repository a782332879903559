"""The training loss, shared by the loop, the captured step and evaluation."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from aegis import packing

from .data import IGNORE

LOSS_CHUNK_TOKENS = 4096  # positions per chunk of the chunked loss: 0.5 GiB of float32 logits at a 32 k vocabulary


def masked_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions, in float32. Counting the positions is left to the
    caller, on the host copy of the labels, so this never waits for the GPU."""
    shift_logits = logits[:, :-1].float()
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def chunked_loss_sum(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """masked_loss_sum of head(hidden) without the whole logits tensor: positions go through the head and the
    cross-entropy `chunk_tokens` at a time, and each chunk's logits are recomputed in the backward pass instead of
    kept (at 32 k tokens Phi-3's 32 064-entry vocabulary would take 4 GiB of float32 logits, and as much again for
    their gradient). hidden: the souled hidden states (SoulHead.deferred); head: the projection to the vocabulary."""
    h = hidden[:, :-1].reshape(-1, hidden.size(-1))
    y = labels[:, 1:].reshape(-1).to(h.device)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for i in range(0, h.size(0), chunk_tokens):
        total = total + checkpoint(
            _chunk_loss, head, h[i : i + chunk_tokens], y[i : i + chunk_tokens], use_reentrant=False
        )
    return total


def _chunk_loss(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, ignore_index=IGNORE, reduction="sum")


def micro_loss(model, head, batch: dict, offload: bool) -> torch.Tensor:
    """A micro-batch's summed loss on the eager path: the model stops at the souled hidden states (the head is
    deferred) and the loss projects them a chunk at a time. No attention mask: padding is only ever on the right,
    where causal attention cannot see it (a window that keeps its documents apart brings their mask and positions,
    aegis/packing.py). With `offload` (the memory plan's, for long sequences) what the forward
    keeps for the backward (with checkpointing: each layer's input) waits in host memory instead of on the GPU."""
    ids = batch["input_ids"]
    keep = torch.autograd.graph.save_on_cpu(pin_memory=ids.is_cuda) if offload else contextlib.nullcontext()
    head.deferred = True
    try:
        with keep:
            hidden = model(input_ids=ids, **packing.model_inputs(model, batch)).logits
            return chunked_loss_sum(hidden, head.head, batch["labels"], LOSS_CHUNK_TOKENS)
    finally:
        head.deferred = False


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())
