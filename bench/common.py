"""What several benchmarks share, so that each measures the same way: Phi-3.5-mini's shapes, the prompts and
the greedy streamed chat request, concurrent clients and the summary of their requests, and the timed training step.

Only the standard library and aegis.tiny load with it (torch and httpx inside the functions that use them):
bench/train_unsloth.py imports it in Unsloth's own environment, where Unsloth must come before transformers.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

from aegis.tiny import shape

# Phi-3.5-mini-instruct's shapes: 3.82 B parameters.
PHI35 = shape(3072, 8192, 32, 32, 32, vocab_size=32064, max_position_embeddings=131072)
PHI35 |= {"original_max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}

# the chat prompts the serve benches send, in turn
PROMPTS = [
    "こんにちは。自己紹介をしてください。",
    "日本の四季について説明してください。",
    "おすすめの本を三冊教えてください。",
    "明日の予定を立てるのを手伝ってください。",
]


def ramp_factors(n: int) -> tuple[list[float], list[float]]:
    """LongRoPE factors rising evenly over the `n` frequencies: short ones from 1 toward 2, long ones toward 5."""
    return [1.0 + i / n for i in range(n)], [1.0 + 4 * i / n for i in range(n)]


def chat_request(model: str, prompt: str, max_tokens: int, **more) -> dict:
    """A greedy streamed chat request of one user turn, its usage in the last chunk; `more` adds fields."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    } | more


async def run_clients(request, clients: int, requests: int, timeout: float, **client_kw) -> tuple[list, float, float]:
    """`clients` concurrent clients on one httpx.AsyncClient, each awaiting request(client, i, k) for k < `requests`
    one after another (i: the client's number): (each client's results, wall seconds, this process's CPU seconds)."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, **client_kw) as client:

        async def worker(i: int) -> list[dict]:
            return [await request(client, i, k) for k in range(requests)]

        cpu0, start = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(worker(i) for i in range(clients)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return results, wall, cpu


def summary(results: list[dict], wall: float) -> dict:
    """Requests' results ({ttft, total, tokens}) sent in `wall` seconds: aggregate and per-request tokens/s, ttft."""
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "wall_s": wall,
        "requests": len(results),
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "per_request_tokens_per_s": statistics.median(r["tokens"] / r["total"] for r in results),
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p90_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
    }


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


def short_run_gguf() -> Path:
    """The f16 GGUF of a short training run of the embedded model, made (and cached under AEGIS_CACHE, by default
    ~/.cache/aegis) the first time: what a bench decodes when it is given no --gguf."""
    from tests.support.serving import exported_run, find_gguf

    return find_gguf(exported_run(Path(os.environ.get("AEGIS_CACHE", Path.home() / ".cache" / "aegis"))))
