"""The MLP of every decoder layer run a slice of positions at a time, for long sequences.

A gated MLP keeps, for the backward pass, about 8 x intermediate_size bytes per position in 16 bits (the gate_up
output, the activation and the product fed to down_proj): at Phi-3.5-mini's shapes 64 KiB, 42 % of what a layer
keeps. With gradient checkpointing one layer is recomputed at a time, and at 80 k positions that one layer's MLP alone
would hold 5 GiB. The MLP treats each position on its own, so it can run on slices of the sequence: each slice is
itself checkpointed (only its input, a view of the layer's, is kept), so at most one slice's intermediates exist at
once. The cost is one more forward pass of the MLP; the result and the gradients are the same as unsliced
(tests/test_tiled.py). aegis/memory.py decides when (train.tiled_mlp).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .forwards import give
from .memory import TILE


def _tiled_forward(forward, chunk: int, hidden: torch.Tensor) -> torch.Tensor:
    flat = hidden.reshape(-1, hidden.size(-1))
    if flat.size(0) <= chunk or not torch.is_grad_enabled():  # short inputs, and inference, run as they were
        return forward(hidden)
    out = [checkpoint(forward, flat[i:i + chunk], use_reentrant=False) for i in range(0, flat.size(0), chunk)]
    return torch.cat(out).view(*hidden.shape[:-1], -1)


def tile_mlps(model: nn.Module, chunk: int = TILE) -> int:
    """Make every decoder layer's `mlp` run `chunk` positions at a time while gradients are recorded. The modules,
    their names and their weights (LoRA included, if it targets the MLP) stay as they are: only the instance's
    forward is wrapped, once. Returns the number of MLPs wrapped."""
    n = 0
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if (type(module).__name__.endswith("DecoderLayer") and isinstance(mlp, nn.Module)
                and give(mlp, _tiled_forward, type(mlp).forward.__get__(mlp), chunk)):
            n += 1
    return n
