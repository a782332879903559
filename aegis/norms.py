"""RMSNorm through torch's fused kernel, for training.

transformers writes RMSNorm in plain tensor operations: cast to float32, square, mean, add, rsqrt, multiply, cast
back, multiply by the weight; eight kernels forward and about twelve backward for each of a model's 2 x layers + 1
norms (Phi-3.5-mini: 65), most of the ~4 750 kernels of a training step at batch 1 x 512, and passes over float32
copies of the hidden states at larger batches. `torch.nn.functional.rms_norm` computes the same in one fused kernel
each way (on CUDA; on the CPU it runs torch's own composition). Models write their norms in different ways (Gemma
scales by 1 + weight), so a norm class is switched only after it has given the fused result on a probe input; the
modules, their weights and names stay as they are, only the instance's forward changes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .forwards import give, given


def _fused(norm: nn.Module, own_forward, hidden: torch.Tensor) -> torch.Tensor:
    weight = norm.weight if norm.weight.dtype == hidden.dtype else norm.weight.to(hidden.dtype)
    return nn.functional.rms_norm(hidden, (hidden.size(-1),), weight, norm.variance_epsilon)


def _same(norm: nn.Module) -> bool:
    """Whether this norm's own forward is the fused one: a float32 copy on the CPU, random weights, a probe input."""
    probe = copy.deepcopy(norm).to("cpu", torch.float32)
    size = probe.weight.numel()
    with torch.no_grad():
        probe.weight.copy_(torch.randn(size, generator=torch.Generator().manual_seed(0)))
        x = torch.randn(3, size, generator=torch.Generator().manual_seed(1)) * 3
        try:
            own = type(norm).forward(probe, x)
        except Exception:  # noqa: BLE001 - a norm that cannot run on its own keeps its own forward
            return False
        return own.shape == x.shape and torch.allclose(own, _fused(probe, None, x), rtol=1e-5, atol=1e-5)


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every RMSNorm of `model` whose class computes exactly RMSNorm (checked once per class) the fused forward.
    Returns how many norms it gave it to."""
    checked: dict[type, bool] = {}
    n = 0
    for module in model.modules():
        if not (
            type(module).__name__.endswith("RMSNorm")
            and isinstance(getattr(module, "weight", None), nn.Parameter)
            and module.weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float)
        ):
            continue
        if given(module, _fused):
            continue
        if type(module) not in checked:
            checked[type(module)] = _same(module)
        if checked[type(module)] and give(module, _fused):
            n += 1
    return n
