"""Peak GPU memory of a training step, estimated from the model's shapes, and the plan that fits a budget.

    peak ≈ weights + logits + activations
    weights      linear layers at 4.25 bits (NF4 + double-quantized scales) or 16 bits; the rest in 16 bits
    logits       min(tokens, 4096) x vocab x 10 bytes (bf16 logits, fp32 copy for the loss, its gradient): the loss
                 projects 4096 positions at a time (train/loss.py)
    activations  without checkpointing: layers x tokens x hidden x 43 bytes;
                 with it: layers x tokens x hidden x 2 bytes kept (in host memory when offloaded), plus one layer
                 recomputed and back-propagated (tokens x hidden x 51);
                 with the MLP tiled (aegis/tiled.py) a layer keeps 8 x intermediate bytes per token less (the MLP's
                 own intermediates), plus those of one slice of 4096 positions; with the attention tiled, 5 bytes
                 per value of q, k and v less, plus those of one group of heads
The byte counts are calibrated at Phi-3.5-mini's shapes (LoRA on the attention projections, SDPA attention): 43 is
the least that keeps the estimate above every measured peak without checkpointing, and 51, for the layer under
recomputation, above every checkpointed one, so the estimate errs on the safe side (the peaks beside their
estimates: BENCHMARKS.md).
Recomputing costs about a third more compute; splitting a batch into micro-batches costs only smaller matrix
products while each keeps about a thousand positions. So with "auto" the plan first looks for the largest
micro-batch that fits without checkpointing, and takes it if it holds at least MIN_MICRO_TOKENS positions (faster
than checkpointing the whole batch: BENCHMARKS.md); otherwise it turns checkpointing on. Then, for long sequences, it
moves the kept activations to host memory (copies overlap the compute but cost PCIe bandwidth) only when the step
still would not fit, and splits the batch into the largest micro-batch that fits: the loss is normalised over the
whole update, so the gradient is the same, only computed in pieces. When one sequence alone still does not fit
(tens of thousands of positions), the MLPs run a slice of positions at a time (train.tiled_mlp), for one more
forward pass of the MLP, and where even that does not fit, the attentions a few heads at a time
(train.tiled_attention), for one more forward pass of the attention. The tiled figures are derived from the shapes
(the attention's 5 bytes per q, k and v value: the fused projection, the rotated q and k, the output and its copy
for o_proj, in 16 bits) and lie above the peaks of the longest sequences measured (BENCHMARKS.md).

A quantized base can also be dequantized once and kept at 16 bits (aegis/dequant.py): bitsandbytes otherwise
dequantizes every NF4 weight on every forward and backward pass, most of a step's GPU time at small batches. The
rule: plan the step with the 4-bit base as above, then keep its checkpointing, offload and micro-batch and
dequantize only if the step still fits with the linear weights at 16 bits. It never buys its memory with more
checkpointing (about a third more compute), offload or splitting: what that gains is too little for a second rule
(BENCHMARKS.md), so a plan that would need them stays at 4 bits.
Forced on, the step is planned around the 16-bit weights, and one that cannot fit even so is an error naming the
key.

A plan whose step is still estimated over the budget in its most frugal form (checkpointing, offload, both tilings,
micro-batch 1, or whatever was forced) is refused before any weights load (aegis/memory_budget.py), with the estimate
and the budget: the allocation would otherwise fail minutes later. On a GPU the budget is train.memory_budget_gib or
what the card has free, if less; on the CPU the step lives in the machine's memory, so it is the setting or the
machine's size (not what happens to be free, so the same config plans the same on the same machine). The estimate
counts 16-bit activations and the CPU computes in fp32: there a refused step is too big all the more, and one that
passes may still be tight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import ConfigError
from .memory_budget import device_budget, refuse_over_budget

ACT_BYTES = 43  # what a layer keeps for its backward pass, per hidden unit and token, without checkpointing
RECOMPUTE_BYTES = 51  # the one layer being recomputed and back-propagated under checkpointing, likewise
MIN_MICRO_TOKENS = 1024  # positions per micro-batch below which recomputing beats splitting the batch further
MARGIN = 1.10  # allocator fragmentation and workspace
LOSS_CHUNK = 4096  # positions the loss projects at a time (train.loss.LOSS_CHUNK_TOKENS)
MLP_BYTES = 8  # per intermediate unit and token: what a gated MLP keeps for its backward pass, in 16 bits
ATTN_BYTES = 5  # per value of q, k and v and token: what attention keeps of them and its output, in 16 bits
TILE = 4096  # positions per MLP slice (aegis/tiled.py): ~256 MiB of intermediates at Phi-3.5-mini's shapes
HEAD_GROUP = 4  # key/value heads per group of the tiled attention (aegis/tiled.py): 8 groups at Phi-3.5-mini's shapes
DEQUANTIZE = "train.dequantized_base = true"  # the setting that forces the dequantized base, as its errors name it


@dataclass(frozen=True)
class Plan:
    gradient_checkpointing: bool
    estimate_gib: float
    budget_gib: float
    micro_batch: int  # sequences per forward pass; below train.batch_size when the batch is split to fit
    offload: bool = False  # checkpointed activations kept in host memory
    dequantized_base: bool = False  # the 4-bit linear weights dequantized once and kept at 16 bits
    why_base: str = ""  # why dequantized_base is on or off, with the estimates it was decided by (for the log)
    tiled_mlp: bool = False  # the MLPs run a slice of positions at a time (aegis/tiled.py)
    tiled_attention: bool = False  # the attentions run HEAD_GROUP key/value heads at a time (aegis/tiled.py)


def estimate_gib(
    config,
    batch: int,
    length: int,
    quantized: bool,
    checkpointing: bool,
    offload: bool = False,
    tiled: bool = False,
    tiled_attention: bool = False,
) -> float:
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter = config.intermediate_size
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = h // heads
    per_layer = h * (heads + 2 * kv) * head_dim + h * h + 3 * h * inter  # attention + gated MLP weights
    linear = layers * per_layer
    other = 2 * vocab * h + (2 * layers + 1) * h  # embeddings, untied head, norms
    weights = linear * (4.25 / 8 if quantized else 2) + other * 2
    tokens = batch * length
    logits = min(tokens, LOSS_CHUNK) * vocab * 10
    per_token = h * (RECOMPUTE_BYTES if checkpointing else ACT_BYTES)  # what one layer keeps per token
    one_slice = 0
    if tiled:
        mlp = min(MLP_BYTES * inter, per_token // 2)
        per_token, one_slice = per_token - mlp, min(tokens, TILE) * mlp
    if tiled_attention:  # one group of heads at a time
        attn, groups = ATTN_BYTES * (heads + 2 * kv) * head_dim, -(-kv // HEAD_GROUP)  # groups rounded up
        per_token -= attn - attn // groups
    if checkpointing:
        act = (0 if offload else layers * tokens * h * 2) + tokens * per_token + one_slice
    else:
        act = layers * tokens * per_token + one_slice
    return MARGIN * (weights + logits + act) / 2**30


def _largest_micro(config, batch: int, length: int, quantized: bool, budget_gib: float, *layout) -> int | None:
    """The largest divisor of the batch whose step fits the budget with this (checkpointing, offload, tiled MLP,
    tiled attention), or None when not even 1 does."""
    return next(
        (
            m
            for m in range(batch, 0, -1)
            if batch % m == 0 and estimate_gib(config, m, length, quantized, *layout) <= budget_gib
        ),
        None,
    )


def _at(config, p: Plan, length: int, quantized: bool) -> float:
    """The estimate of plan `p` with the linear weights at 4.25 bits (quantized) or 16."""
    return estimate_gib(
        config, p.micro_batch, length, quantized, p.gradient_checkpointing, p.offload, p.tiled_mlp, p.tiled_attention
    )


def plan(
    config,
    batch: int,
    length: int,
    quantized: bool,
    budget_gib: float,
    requested: bool | str,
    offload: bool | str = False,
    dequantize: bool | str = False,
    gpu: bool = True,
    tiled: bool | str = False,
    tiled_attention: bool | str = False,
) -> Plan:
    """Gradient checkpointing as requested, or with "auto" only if the step would not fit the budget without it,
    not even split into micro-batches of MIN_MICRO_TOKENS positions or more; activation offload likewise (with
    checkpointing only: it moves what checkpointing keeps); the tiled MLP likewise, when even one sequence would not
    fit, and then the tiled attention; then, if the step still does not fit, the largest divisor of the batch that
    does as the micro-batch. Then the dequantized base (`dequantize`, train.dequantized_base) by the rule in this
    module's docstring; "auto" is off where the step runs without a GPU (`gpu` False): the budget and the time it
    saves are the GPU's, and at the CPU's fp32 compute a dense copy would take ~7.5x the 4-bit layers' host
    memory."""
    if dequantize is True and not quantized:
        raise ConfigError(
            DEQUANTIZE, ['model.quantization is "none": the base is already at 16 bits, there is nothing to dequantize']
        )
    bits4 = quantized and dequantize is not True  # a base dequantized by request is planned at 16 bits
    if requested == "auto":  # no recompute while a micro-batch without it keeps MIN_MICRO_TOKENS positions
        free = _largest_micro(config, batch, length, bits4, budget_gib, False)
        ckpt = free is None or (free < batch and free * length < MIN_MICRO_TOKENS)
    else:
        ckpt = bool(requested)
    if offload == "auto":
        off = ckpt and estimate_gib(config, batch, length, bits4, True) > budget_gib
    else:
        off = ckpt and bool(offload)
    # each tiling only when one sequence alone does not fit otherwise
    tile = estimate_gib(config, 1, length, bits4, ckpt, off) > budget_gib if tiled == "auto" else bool(tiled)
    heads = (
        estimate_gib(config, 1, length, bits4, ckpt, off, tile) > budget_gib
        if tiled_attention == "auto"
        else bool(tiled_attention)
    )
    micro = _largest_micro(config, batch, length, bits4, budget_gib, ckpt, off, tile, heads) or 1
    p = Plan(ckpt, 0.0, budget_gib, micro, off, tiled_mlp=tile, tiled_attention=heads)
    p = replace(p, estimate_gib=_at(config, p, length, bits4))
    return _with_base(p, config, length, quantized, dequantize, gpu)


def _with_base(p: Plan, config, length: int, quantized: bool, dequantize: bool | str, gpu: bool) -> Plan:
    """Plan `p` (made at 16 bits where `dequantize` is True, else at the base's bits) with its base's decision."""
    if dequantize is True:
        if p.estimate_gib > p.budget_gib:
            raise ConfigError(
                DEQUANTIZE,
                [
                    f"with the base's linear weights at 16 bits the step is estimated at "
                    f"{p.estimate_gib:.1f} GiB at micro-batch {p.micro_batch}, gradient checkpointing "
                    f"{'on' if p.gradient_checkpointing else 'off'}: over train.memory_budget_gib "
                    f'{p.budget_gib:g}; set it to "auto" or false, lower train.max_length or raise '
                    f"the budget"
                ],
            )
        why = f"{DEQUANTIZE}: ~{p.estimate_gib:.1f} GiB, ~{_at(config, p, length, True):.1f} GiB at 4 bits"
        return replace(p, dequantized_base=True, why_base=why)
    if not quantized or dequantize is False or not gpu:
        why = (
            "the base is not quantized"
            if not quantized
            else "train.dequantized_base = false"
            if dequantize is False
            else '"auto" without a CUDA device'
        )
        return replace(p, why_base=why)
    dense = _at(config, p, length, False)  # the same plan, 16-bit linear weights
    on = dense <= p.budget_gib
    why = f"~{dense:.1f} GiB with the base dequantized, ~{p.estimate_gib:.1f} GiB at 4 bits: " + (
        "fits the budget with the same checkpointing and micro-batch" if on else "over the budget"
    )
    return replace(p, estimate_gib=dense if on else p.estimate_gib, dequantized_base=on, why_base=why)


def plan_for(cfg, base_config, device, log=None) -> Plan:
    """`plan` for a run's config (aegis/config.py) and the base's config on `device`, within
    train.memory_budget_gib or what the GPU has free (on the CPU: the machine's memory) if that is less (said
    through `log`). A step that cannot fit even so is a ConfigError with the estimate and the budget."""
    import os

    import torch

    if device.type == "cuda" and torch.cuda.is_available():
        budget, note = device_budget(cfg.train.memory_budget_gib, torch.cuda.mem_get_info(device)[0] / 2**30)
    else:  # the step runs in the machine's memory: its size, not what happens to be free now (plans stay the same)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        budget, note = device_budget(cfg.train.memory_budget_gib, total, "this machine has {:.1f} GiB of memory")
    if note and log is not None:
        log(note)
    p = plan(
        base_config,
        cfg.train.batch_size,
        cfg.train.max_length,
        cfg.model.quantization == "nf4",
        budget,
        cfg.model.gradient_checkpointing,
        cfg.train.offload_activations,
        cfg.train.dequantized_base,
        gpu=device.type == "cuda",
        tiled=cfg.train.tiled_mlp,
        tiled_attention=cfg.train.tiled_attention,
    )
    refuse_over_budget(p, cfg.train.max_length, cfg.train.batch_size)
    return p


def summary(p: Plan, batch: int, quantized: bool) -> str:
    """The plan in one line, as training logs it."""
    split = batch // p.micro_batch
    return (
        f"memory plan: ~{p.estimate_gib:.1f} GiB of {p.budget_gib:g} GiB with gradient checkpointing "
        f"{'on' if p.gradient_checkpointing else 'off'}"
        + (", its kept activations in host memory" if p.offload else "")
        + (f", each MLP {TILE} positions at a time" if p.tiled_mlp else "")
        + (f", each attention {HEAD_GROUP} key/value heads at a time" if p.tiled_attention else "")
        + (f"; each batch of {batch} runs as {split} micro-batches of {p.micro_batch}" if split > 1 else "")
        + (
            f"; base {'dequantized once' if p.dequantized_base else 'kept at 4 bits'} ({p.why_base})"
            if quantized
            else ""
        )
    )
