"""What several benchmarks share, so that each measures the same way: Phi-3.5-mini's shapes and the timed training
step.

Only the standard library and aegis.tiny load with it (torch inside the function that uses it):
bench/train_unsloth.py imports it in Unsloth's own environment, where Unsloth must come before transformers.
"""

from __future__ import annotations

import time

from aegis.tiny import shape

# Phi-3.5-mini-instruct's shapes: 3.82 B parameters.
PHI35 = shape(3072, 8192, 32, 32, 32, vocab_size=32064, max_position_embeddings=131072)
PHI35 |= {"original_max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}


def ramp_factors(n: int) -> tuple[list[float], list[float]]:
    """LongRoPE factors rising evenly over the `n` frequencies: short ones from 1 toward 2, long ones toward 5."""
    return [1.0 + i / n for i in range(n)], [1.0 + 4 * i / n for i in range(n)]


def train_steps(model, batches, params: list, opt) -> tuple[list[int], list[float], list[float]]:
    """One optimizer step per batch (HF forward with labels, gradients clipped at 1.0), each timed from the inputs on
    the GPU to the step done: (real tokens, loss, seconds) per step."""
    import torch

    tokens, losses, times = [], [], []
    for b in batches:
        ids, labels, mask = (b[k].cuda() for k in ("input_ids", "labels", "attention_mask"))
        tokens.append(int(b["attention_mask"].sum()))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return tokens, losses, times
