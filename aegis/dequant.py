"""The 4-bit base dequantized once: each frozen bitsandbytes Linear4bit becomes a plain linear layer holding the
weight bitsandbytes would otherwise dequantize on every forward and backward pass.

At small batches most of a step's GPU time is that dequantization (the profile in BENCHMARKS.md). Doing it once
costs memory, 16 bits per weight instead of 4.25 (aegis/memory.py decides when that fits), and changes no
number that matters: the weight is `dequantize_4bit`'s output, the very tensor bitsandbytes' own backward multiplies
by; its forward dequantizes the same way before the matmul, or (few rows, some GPUs) multiplies the same weights in
a fused 4-bit kernel that sums in another order. The logits and gradients match the 4-bit path up to the rounding of
the matmul (tests/test_dequant.py: bit for bit on the CPU in fp32).

The LoRA wrappers PEFT put around the 4-bit layers are kept as they are; only their `base_layer` is swapped, and
the bare 4-bit layers (the MLP's, which carry no LoRA) are swapped in place. Only the training model is converted:
checkpoints hold the adapter and the soul, never the base, and every reader (resume, chat, eval, export's merge and
its quantization gap, serve) loads the base from disk again (aegis/loading.py load_checkpoint), so no reader ever
sees these layers or misses their 4-bit weights.
"""

from __future__ import annotations

import gc

import torch
from torch import nn
from torch.nn import functional as F


class DequantizedLinear(nn.Linear):
    """A frozen linear layer with a dequantized weight. Like bitsandbytes' Linear4bit it computes in its compute
    dtype and returns the input's dtype, so it drops in wherever one was."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def dense_weight(layer) -> torch.Tensor:
    """The weight a bitsandbytes Linear4bit multiplies by, (out, in) in its quantization dtype."""
    import bitsandbytes.functional as bnbf

    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a CPU layer for inference after a no-grad eval forward, with bf16 scales; its
        # inverse re-quantizes the scales, so the exact weight is gone. Conversion happens before any forward.
        raise RuntimeError(
            "a 4-bit layer was repacked for CPU inference before it was dequantized; dequantize the "
            "base right after loading it"
        )
    return bnbf.dequantize_4bit(layer.weight.data, state)


def dequantized(layer) -> DequantizedLinear:
    """A DequantizedLinear equal to the Linear4bit `layer`, in its compute dtype, frozen."""
    dtype = layer.compute_dtype or layer.weight.quant_state.dtype
    with torch.device("meta"):  # no throwaway initialisation of a weight about to be replaced
        dense = DequantizedLinear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    dense.weight = nn.Parameter(dense_weight(layer).to(dtype), requires_grad=False)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    dense.train(layer.training)
    return dense


def dequantize_base(model: nn.Module, convert=dequantized) -> tuple[int, int]:
    """Swap every bitsandbytes Linear4bit in `model` (a PEFT model or a bare one) for its DequantizedLinear, one
    layer at a time so the peak is the dense weights plus one 4-bit layer. Returns (layers, bytes of dense weights).
    `convert` makes each dense layer (tests pass a wrong one to show the comparisons would catch it)."""
    import bitsandbytes as bnb

    targets = [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    size = 0
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        dense = convert(old)
        setattr(parent, child, dense)
        size += sum(t.numel() * t.element_size() for t in dense.parameters())
        # a Params4bit and its module refer to each other; without the cycle the 4-bit storage goes right here,
        # not at the next run of the cycle collector
        if getattr(old.weight, "module", None) is old:
            old.weight.module = None
        del old
    gc.collect()  # anything else that held on
    return len(targets), size
