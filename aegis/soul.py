"""The soul: a gated block-diagonal SO(8) rotation in front of the LM head.

For a hidden state h of size H (H divisible by 8) split into B = H/8 blocks of 8:

    R_b = matrix_exp(A_b - A_b^T)            A_b strictly upper-triangular, 28 free values per block
    h'  = h + g * (R h - h)                   mix = "interpolate" (default; g = 0 is the base model)
    h'  = h + g * R h                         mix = "residual" (the seed code's form)
    g   = sigmoid(alpha)

The exponential of a skew-symmetric matrix is exactly orthogonal with determinant +1, so R is in SO(8)^B by
construction (no penalty term). Everything here runs in float32 whatever the model's dtype. Because h' = M h is
linear, the head W h' = (W M) h folds into one weight: `fold()` returns W M.
"""

from __future__ import annotations

import torch
from torch import nn

from .config_checks import INITS, MIXES

BLOCK = 8
FREE = BLOCK * (BLOCK - 1) // 2  # 28


class Soul(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        mix: str = "interpolate",
        init: str = "identity",
        alpha: float = -5.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if hidden_size % BLOCK:
            raise ValueError(f"soul: hidden size {hidden_size} is not divisible by {BLOCK}")
        if mix not in MIXES:
            raise ValueError(f"soul.mix: {mix!r} is not one of {', '.join(MIXES)}")
        if init not in INITS:
            raise ValueError(f"soul.init: {init!r} is not one of {', '.join(INITS)}")
        self.hidden_size, self.mix, self.blocks = hidden_size, mix, hidden_size // BLOCK
        params = torch.zeros(self.blocks, FREE)
        if init == "random":  # the seed code starts from a random rotation
            params = torch.randn(self.blocks, FREE, generator=generator) * 0.1
        self.generators = nn.Parameter(params)  # (B, 28)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=False)
        rows, cols = torch.triu_indices(BLOCK, BLOCK, offset=1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        # set by a captured training step (train/graphs.py), which computes R outside the graph and feeds it in
        self.rotation_input: torch.Tensor | None = None

    def rotation(self) -> torch.Tensor:
        """R as (B, 8, 8) float32. The exponential is taken in float64 (B tiny 8x8 matrices, so it costs nothing):
        in float32 its orthogonality error grows past 1e-5 once the generators are large."""
        a = self.generators.new_zeros(self.blocks, BLOCK, BLOCK, dtype=torch.float64)
        a[:, self._rows, self._cols] = self.generators.double()
        return torch.linalg.matrix_exp(a - a.transpose(1, 2)).float()

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha.float())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., H) -> h' (..., H), float32."""
        x = h.float().unflatten(-1, (self.blocks, BLOCK))
        r = self.rotation() if self.rotation_input is None else self.rotation_input
        rx = torch.einsum("bij,...bj->...bi", r, x)
        g = self.gate()
        out = x + g * (rx - x) if self.mix == "interpolate" else x + g * rx
        return out.flatten(-2)

    def matrix(self) -> torch.Tensor:
        """The (H, H) float32 map M with soul(h) = M h."""
        r = torch.block_diag(*self.rotation())
        eye = torch.eye(self.hidden_size, device=r.device)
        g = self.gate()
        return eye + g * (r - eye) if self.mix == "interpolate" else eye + g * r

    @torch.no_grad()
    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """The head weight W M (float32) that computes head(soul(h)) with no soul; checked for NaN/inf."""
        folded = weight.float() @ self.matrix().to(weight.device)
        if not torch.isfinite(folded).all():
            raise ValueError("soul.fold: the folded head weight is not finite")
        return folded

    @torch.no_grad()
    def health(self) -> dict[str, float]:
        """Figures for the logs: how exact and how formed the rotation is."""
        r = self.rotation().double()
        eye = torch.eye(BLOCK, device=r.device, dtype=r.dtype)
        ortho = torch.linalg.matrix_norm(r.transpose(1, 2) @ r - eye)
        det = torch.linalg.det(r)
        return {
            "alpha": float(self.alpha),
            "gate": float(self.gate()),
            "ortho_error": float(ortho.max()),
            "det_min": float(det.min()),
            "det_max": float(det.max()),
            "rotation_norm": float(torch.linalg.matrix_norm(r - eye).mean()),
        }


class SoulHead(nn.Module):
    """Wraps the model's LM head so generate(), the KV cache and every HF utility keep working. While `deferred`,
    the model's "logits" are the souled hidden states and the caller projects them itself (training's loss does,
    a chunk of positions at a time, so the logits of a long sequence never exist all at once)."""

    def __init__(self, head: nn.Linear, soul: Soul):
        super().__init__()
        self.head, self.soul = head, soul
        self.deferred = False

    @property
    def weight(self) -> torch.Tensor:  # some HF utilities read lm_head.weight
        return self.head.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.soul(h).to(self.head.weight.dtype)
        return h if self.deferred else self.head(h)


def attach(model: nn.Module, soul: Soul) -> SoulHead:
    """Put `soul` in front of `model`'s output embedding (an HF PreTrainedModel, PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if isinstance(head, SoulHead):
        raise ValueError("soul: this model already has a soul attached")
    if head.in_features != soul.hidden_size:
        raise ValueError(f"soul: hidden size {soul.hidden_size} does not match the model's head ({head.in_features})")
    wrapped = SoulHead(head, soul.to(head.weight.device))
    base.set_output_embeddings(wrapped)
    return wrapped


def head_of(model: nn.Module) -> SoulHead:
    for module in model.modules():
        if isinstance(module, SoulHead):
            return module
    raise ValueError("soul: this model has no soul attached")


def find(model: nn.Module) -> Soul | None:
    for module in model.modules():
        if isinstance(module, Soul):
            return module
    return None
