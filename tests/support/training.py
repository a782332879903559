"""What the tests of the training forward paths share."""

from __future__ import annotations

import torch

from aegis import soul as soul_mod
from aegis.forwards import given, take_back
from aegis.tiny import shape
from train.loss import micro_loss

# a decoder small enough to build and export inside a test: two layers, grouped-query attention
SMALL_SHAPE = shape(64, 128, 2, 4, 2, max_position_embeddings=512)


def phi35_mini():
    """A Phi3Config of Phi-3.5-mini's shapes, for the plans and slices that depend on shapes alone."""
    from transformers import Phi3Config

    return Phi3Config(**shape(3072, 8192, 32, 32, 32, vocab_size=32064))


def loss_and_grads(model, ids: torch.Tensor, offload: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch through the training loop's own loss (the sequence is its own labels): the loss and every
    gradient, which are then cleared. The seed is fixed first, so every call draws the same dropout masks."""
    torch.manual_seed(0)
    loss = micro_loss(model, soul_mod.head_of(model), {"input_ids": ids, "labels": ids}, offload)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def restore_forwards(model, fn) -> int:
    """Every module of `model` that runs `fn` back to its class's own forward; returns how many."""
    modules = [m for m in model.modules() if given(m, fn)]
    for m in modules:
        take_back(m)
    return len(modules)


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float) -> None:
    """Every gradient within `rel` of the reference, measured over the whole tensor (the norm of the difference over
    the reference's norm): in bf16, single elements near zero differ by more than any elementwise tolerance allows,
    while a wrong product, scaling or lost slice moves the whole tensor. The worst one is printed either way."""
    errors = {
        n: float((got[n].float() - want[n].float()).norm() / want[n].float().norm().clamp_min(1e-30)) for n in want
    }
    worst = max(errors, key=errors.get)
    print(f"worst relative gradient difference: {errors[worst]:.2e} ({worst}); limit {rel:.0e}")
    bad = {n: e for n, e in errors.items() if not e <= rel}
    assert not bad, f"{len(bad)} of {len(errors)} gradients differ by more than {rel:.0e}: {bad}"
