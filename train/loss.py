"""The training loss, shared by the loop, the captured step and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE


def masked_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions, in float32. Counting the positions is left to the
    caller, on the host copy of the labels, so this never waits for the GPU."""
    shift_logits = logits[:, :-1].float()
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())
