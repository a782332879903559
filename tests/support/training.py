"""What the tests of the training forward paths share."""

from __future__ import annotations

import torch

from aegis import soul as soul_mod
from train.loss import micro_loss


def loss_and_grads(model, ids: torch.Tensor, offload: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch through the training loop's own loss (the sequence is its own labels): the loss and every
    gradient, which are then cleared. The seed is fixed first, so every call draws the same dropout masks."""
    torch.manual_seed(0)
    loss = micro_loss(model, soul_mod.head_of(model), {"input_ids": ids, "labels": ids}, offload)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads
