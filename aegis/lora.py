"""LoRA's forward pass for training: in the compute dtype, its product added inside the second matmul.

PEFT's `lora.Linear` casts the layer's input to the adapter's dtype (float32, where the optimizer keeps the weights)
and computes the adapter there: base(x) + B(A(dropout(x))) * scaling, then casts the sum back. On a GPU computing
in bf16 that is, per adapted layer and pass, a float32 copy of the input, float32 dropout, two float32 matmuls, a
float32 scaling and sum the size of the output, and a cast back: memory traffic and kernels that outnumber the two
small matmuls themselves. Here the adapter runs in the input's dtype, as under autocast: the float32 weights are cast
(A, and B with the scaling folded in: r x in and out x r values), and B's product is added to the base output by
`addmm`, in the matmul. Gradients still reach the float32 weights through the casts. The weights, their names and
what is saved are PEFT's; only the instance's forward changes, and only where the layer is plain LoRA (one adapter,
no DoRA or other variant, no bias on B), over a plain or a bitsandbytes 4-bit base; any other state falls back to
PEFT's own forward. On the CPU, which computes in float32, the result is PEFT's to rounding (tests/test_lora.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .forwards import give

ADAPTER = "default"


def plain(layer) -> bool:
    """One adapter, a plain linear A, no bias on B, no DoRA or other variant: what the forwards here reproduce."""
    return (
        list(layer.lora_A.keys()) == [ADAPTER]
        and isinstance(layer.lora_A[ADAPTER], nn.Linear)
        and layer.lora_B[ADAPTER].bias is None
        and not layer.use_dora.get(ADAPTER, False)
        and ADAPTER not in getattr(layer, "lora_variant", {})
    )


def in_use(layer) -> bool:
    """Its one adapter active and not merged into the base, checked at each call: PEFT can change either."""
    return not layer.disable_adapters and not layer.merged and list(layer.active_adapters) == [ADAPTER]


def _forward(layer, peft_forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or not in_use(layer):
        return peft_forward(x, *args, **kwargs)
    result = layer.base_layer(x)
    dtype = result.dtype
    a = layer.lora_A[ADAPTER].weight.to(dtype)
    b = (layer.lora_B[ADAPTER].weight * layer.scaling[ADAPTER]).to(dtype)
    low = nn.functional.linear(layer.lora_dropout[ADAPTER](x.to(dtype)), a)
    out = torch.addmm(result.reshape(-1, result.size(-1)), low.reshape(-1, low.size(-1)), b.t())
    return out.view(result.shape)


def _classes() -> tuple[type, ...]:
    """PEFT's LoRA linear layer, and its twin over a 4-bit base where bitsandbytes is installed."""
    from peft.tuners.lora import bnb, layer

    return (layer.Linear,) + ((bnb.Linear4bit,) if hasattr(bnb, "Linear4bit") else ())


def compute_dtype_lora(model: nn.Module) -> int:
    """Give every plain LoRA linear layer of `model` the forward above (once). Returns how many it gave it to."""
    classes = _classes()
    n = 0
    for module in model.modules():
        if type(module) in classes and plain(module) and give(module, _forward):
            n += 1
    return n
