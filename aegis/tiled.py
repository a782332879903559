"""The MLP of every decoder layer run a slice of positions at a time, for long sequences.

A gated MLP keeps, for the backward pass, about 8 x intermediate_size bytes per position in 16 bits (the gate_up
output, the activation and the product fed to down_proj): at Phi-3.5-mini's shapes 64 KiB, 42 % of what a layer
keeps. With gradient checkpointing one layer is recomputed at a time, and at 80 k positions that one layer's MLP alone
would hold 5 GiB. The MLP treats each position on its own, so it can run on slices of the sequence: each slice is
itself checkpointed (only its input, a view of the layer's, is kept), so at most one slice's intermediates exist at
once. The cost is one more forward pass of the MLP; the result and the gradients are the same as unsliced
(tests/test_tiled.py). aegis/memory.py decides when (train.tiled_mlp).

Past that, what one recomputed layer holds at once is mostly its attention: the fused q, k, v projection, the
rotated queries and keys, the output and their gradients, all for the whole sequence. Attention heads are
independent of each other until o_proj sums them, so the attention can run a few heads at a time instead: each
group projects its own rows of qkv_proj (LoRA's B rows with them), attends, and multiplies its own columns of o_proj
(LoRA's A columns with them); the groups' outputs are summed. Each group is checkpointed, keeping only the layer's
normed input, so one group's intermediates exist at once (train.tiled_attention). LoRA's product on the input,
x A^T, is computed once for all groups; dropout on o_proj's input is drawn per group, the same distribution as one
draw over the whole. A 4-bit base is dequantized once per layer pass for its groups, as bitsandbytes itself would
for the whole.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .forwards import give
from .lora import ADAPTER, in_use, plain
from .memory import HEAD_GROUP, TILE


def _tiled_forward(mlp, forward, hidden: torch.Tensor) -> torch.Tensor:
    chunk = mlp.tile_positions
    flat = hidden.reshape(-1, hidden.size(-1))
    if flat.size(0) <= chunk or not torch.is_grad_enabled():  # short inputs, and inference, run as they were
        return forward(hidden)
    out = [checkpoint(forward, flat[i : i + chunk], use_reentrant=False) for i in range(0, flat.size(0), chunk)]
    return torch.cat(out).view(*hidden.shape[:-1], -1)


def tile_mlps(model: nn.Module, chunk: int = TILE) -> int:
    """Make every decoder layer's `mlp` run `chunk` positions at a time while gradients are recorded. The modules,
    their names and their weights (LoRA included, if it targets the MLP) stay as they are: only the instance's
    forward is wrapped, once. Returns the number of MLPs wrapped."""
    n = 0
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if (
            type(module).__name__.endswith("DecoderLayer")
            and isinstance(mlp, nn.Module)
            and give(mlp, _tiled_forward, tile_positions=chunk)
        ):
            n += 1
    return n


def _weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A frozen base layer's (out, in) weight in `dtype`: its own, or a 4-bit layer's dequantized."""
    if getattr(linear.weight, "quant_state", None) is not None:
        from .dequant import dense_weight

        return dense_weight(linear).to(dtype)
    return linear.weight.to(dtype)


def _split(proj: nn.Module, dtype: torch.dtype):
    """(weight, LoRA A, LoRA B x scaling, LoRA dropout) of a projection, the LoRA parts None without an adapter;
    None where PEFT's layer is in a state this path does not reproduce (merged, disabled, several adapters)."""
    base = getattr(proj, "base_layer", proj)
    if base.bias is not None:
        return None
    if base is proj:
        return _weight(proj, dtype), None, None, None
    if not (plain(proj) and in_use(proj)):
        return None
    return (
        _weight(proj.base_layer, dtype),
        proj.lora_A[ADAPTER].weight.to(dtype),
        (proj.lora_B[ADAPTER].weight * proj.scaling[ADAPTER]).to(dtype),
        proj.lora_dropout[ADAPTER],
    )


def _group(attn, rope, rows, x, low, w_qkv, b_qkv, cos, sin, w_o, a_o, drop_o):
    """One group of heads: its q, k, v rows projected, attended, and its columns of o_proj applied. Returns its share
    of o_proj's output and, where o_proj has LoRA, of the adapter's low-rank product."""

    def project(r: slice) -> torch.Tensor:
        y = F.linear(x, w_qkv[r])
        if low is not None:
            y = y + F.linear(low, b_qkv[r])
        return y.view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2)

    q, k, v = (project(r) for r in rows[:3])
    q, k = rope(q, k, cos, sin)
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=attn.num_key_value_groups > 1
    )
    out = out.transpose(1, 2).reshape(*x.shape[:-1], -1)
    cols = rows[3]
    mine = F.linear(out, w_o[:, cols])
    return (mine, F.linear(drop_o(out), a_o[:, cols])) if a_o is not None else (mine,)


def _groups(attn, per_group: int) -> list[tuple[slice, slice, slice, slice]]:
    """(q rows, k rows, v rows of qkv_proj, o_proj columns) of each group of `per_group` key/value heads."""
    d, kv, rep = attn.head_dim, attn.num_key_value_heads, attn.num_key_value_groups
    q_end = kv * rep * d
    out = []
    for j in range(0, kv, per_group):
        n = min(per_group, kv - j)
        q = slice(j * rep * d, (j + n) * rep * d)
        out.append(
            (
                q,
                slice(q_end + j * d, q_end + (j + n) * d),
                slice(q_end + kv * d + j * d, q_end + kv * d + (j + n) * d),
                q,
            )
        )
    return out


def _tiled_attention(attn, forward, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    dropout = attn.training and getattr(attn, "attention_dropout", 0.0)
    tiled = (
        hidden_states.size(-2) > attn.tile_longer_than
        and torch.is_grad_enabled()
        and not args
        and attention_mask is None
        and cache is None
        and not dropout
    )
    # the weights (a 4-bit base dequantized) only where the groups will use them
    parts = (_split(attn.qkv_proj, hidden_states.dtype), _split(attn.o_proj, hidden_states.dtype)) if tiled else None
    if not tiled or None in parts:
        return forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    (w_qkv, a_qkv, b_qkv, drop_qkv), (w_o, a_o, b_o, drop_o) = parts
    x = hidden_states
    low = checkpoint(lambda t: F.linear(drop_qkv(t), a_qkv), x, use_reentrant=False) if a_qkv is not None else None
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    cos, sin = position_embeddings
    total = low_o = None
    for rows in _groups(attn, attn.tile_heads):
        got = checkpoint(
            _group, attn, rope, rows, x, low, w_qkv, b_qkv, cos, sin, w_o, a_o, drop_o, use_reentrant=False
        )
        total = got[0] if total is None else total + got[0]
        if a_o is not None:
            low_o = got[1] if low_o is None else low_o + got[1]
    if a_o is not None:
        total = total + F.linear(low_o, b_o)
    return total, None


def tile_attentions(model: nn.Module, per_group: int = HEAD_GROUP, longer_than: int = TILE) -> int:
    """Make every fused-projection attention (qkv_proj and o_proj, as Phi-3's) run `per_group` key/value heads at a
    time on sequences longer than `longer_than` positions while gradients are recorded; anything else (a mask, a
    cache, inference, attention dropout, a bias) runs the module's own forward, once. Returns how many it wrapped."""
    n = 0
    for module in model.modules():
        if (
            all(
                hasattr(module, a)
                for a in ("qkv_proj", "o_proj", "head_dim", "num_key_value_heads", "num_key_value_groups", "scaling")
            )
            and hasattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb")
            and give(module, _tiled_attention, tile_heads=per_group, tile_longer_than=longer_than)
        ):
            n += 1
    return n
