"""What `serve --cache-type q8_0` buys and costs against f16: the slots it fits in the same memory, and how far its
logits move.

    python bench/cache_type.py [--gguf FILE] [--ctx 512] [--chunk 128] [--threads N] [--out FILE.json]

Memory: bytes of KV cache per position from the GGUF's own shapes (layers x (K + V) values per position; f16 two
bytes a value, q8_0 34 bytes per block of 32), and the slots of --ctx positions that a fixed cache budget holds,
for this GGUF and for Phi-3.5-mini's shapes with the 4 096-position context the Borea recipe serves.

Parity: the held-out text of the embedded corpus (aegis/corpus/*_eval*), cut into windows of --ctx tokens, each
read as the server reads a prompt (chunks of --chunk positions through one sequence's KV cache, so every position
attends to keys and values as the cache type stores them), once per cache type with the server's own context
parameters (aegis/llamacpp.py `context_params`). Compared position by position: the next-token perplexity of
each, how often the most likely token is the same, and the KL divergence of q8_0's distribution from f16's (mean
and the largest). Without --gguf, the GGUF of a short training run of the embedded model is made (and cached).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aegis.llamacpp import CACHE_TYPES, context_params, load_model, open_vocab, runtime  # noqa: E402
from aegis.tiny import CORPUS_EVAL, texts  # noqa: E402
from bench.common import short_run_gguf  # noqa: E402

BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 values and one f16 scale per block
# Phi-3.5-mini: 32 layers, 32 key/value heads of 96 values each (no grouped-query sharing)
PHI35 = dict(layers=32, kv_values=32 * 96)


def kv_bytes_per_position(layers: int, kv_values: int, cache_type: str) -> float:
    """Keys and values of every layer for one position."""
    return layers * 2 * kv_values * BYTES_PER_VALUE[cache_type]


def slots_within(budget_bytes: float, ctx: int, layers: int, kv_values: int) -> dict:
    """How many slots of `ctx` positions each cache type fits in `budget_bytes`."""
    return {t: int(budget_bytes // (ctx * kv_bytes_per_position(layers, kv_values, t))) for t in CACHE_TYPES}


def eval_text() -> str:
    """The corpus's held-out prose paragraphs and held-out chats (their turns' text, one per line)."""
    return "\n".join(texts(CORPUS_EVAL, lambda messages: "\n".join(m["content"] for m in messages)))


def window_logprobs(lib, ctx, batch, window: list[int], chunk: int, n_vocab: int) -> np.ndarray:
    """Log-probabilities (float64) at every position of one window, read chunk by chunk into a cleared cache."""
    lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
    rows = []
    for start in range(0, len(window), chunk):
        part = window[start : start + chunk]
        for j, token in enumerate(part):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, start + j, 1
            batch.seq_id[j][0] = 0
            batch.logits[j] = True
        batch.n_tokens = len(part)
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        for j in range(len(part)):
            rows.append(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, j), shape=(n_vocab,)).astype(np.float64))
    logits = np.stack(rows)
    top = logits.max(axis=1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))


def read_all(path: Path, windows: list[list[int]], cache_type: str, chunk: int, threads: int):
    """(the model's KV shape: layers and key/value values per position, each window's log-probabilities)."""
    lib = runtime()
    model = load_model(path, extra_bufts=True)
    n_embd, n_head = lib.llama_model_n_embd(model), lib.llama_model_n_head(model)
    shape = dict(layers=lib.llama_model_n_layer(model), kv_values=n_embd // n_head * lib.llama_model_n_head_kv(model))
    ctx_len = max(len(w) for w in windows)
    ctx = lib.llama_init_from_model(model, context_params(ctx_len, 1, chunk, threads, cache_type))
    batch = lib.llama_batch_init(chunk, 0, 1)
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    try:
        return shape, [window_logprobs(lib, ctx, batch, w, chunk, n_vocab) for w in windows]
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)


def compare(windows: list[list[int]], f16: list[np.ndarray], q8: list[np.ndarray]) -> dict:
    """Next-token perplexity under each, top-1 agreement and KL(f16 || q8_0) over every predicted position."""
    nll = {"f16": [], "q8_0": []}
    kl, same = [], []
    for w, a, b in zip(windows, f16, q8):
        targets = np.array(w[1:])
        nll["f16"] += list(-a[np.arange(len(targets)), targets])
        nll["q8_0"] += list(-b[np.arange(len(targets)), targets])
        kl += list((np.exp(a) * (a - b)).sum(axis=1))
        same += list(a.argmax(axis=1) == b.argmax(axis=1))
    return dict(
        positions=len(kl),
        perplexity={t: float(np.exp(np.mean(v))) for t, v in nll.items()},
        top1_agreement=float(np.mean(same)),
        kl_mean=float(np.mean(kl)),
        kl_max=float(np.max(kl)),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--ctx", type=int, default=512, help="positions per window and per slot")
    ap.add_argument("--chunk", type=int, default=128, help="positions per llama_decode, as the server's --batch-size")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--budget-gib", type=float, default=6.0, help="KV cache budget for the Phi-3.5-mini slot count")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    gguf = args.gguf or short_run_gguf()
    ids = open_vocab(gguf).tokenize(eval_text().encode("utf-8"), add_bos=False, special=False)
    windows = [ids[i : i + args.ctx] for i in range(0, len(ids) - args.ctx + 1, args.ctx)]
    started = time.perf_counter()
    (shape, f16), (_, q8) = (read_all(gguf, windows, t, args.chunk, args.threads) for t in CACHE_TYPES)
    parity = compare(windows, f16, q8)
    budget = 4 * args.ctx * kv_bytes_per_position(**shape, cache_type="f16")  # what four f16 slots take
    memory = dict(
        this_gguf=dict(
            shape,
            bytes_per_position={t: kv_bytes_per_position(**shape, cache_type=t) for t in CACHE_TYPES},
            slots_in_four_f16_slots=slots_within(budget, args.ctx, **shape),
        ),
        phi35_mini=dict(
            PHI35,
            bytes_per_position={t: kv_bytes_per_position(**PHI35, cache_type=t) for t in CACHE_TYPES},
            slots_of_4096_within_budget=slots_within(args.budget_gib * 2**30, 4096, **PHI35),
            budget_gib=args.budget_gib,
        ),
    )
    print(f"{len(windows)} windows of {args.ctx} tokens, {parity['positions']} positions compared")
    ppl = parity["perplexity"]
    print(f"perplexity f16 {ppl['f16']:.4f}, q8_0 {ppl['q8_0']:.4f} ({ppl['q8_0'] / ppl['f16'] - 1:+.3%})")
    kl = f"KL(f16||q8_0) mean {parity['kl_mean']:.2e}, max {parity['kl_max']:.2e}"
    print(f"top-1 agreement {parity['top1_agreement']:.4%}; {kl}")
    for name, m in memory.items():
        per = m["bytes_per_position"]
        slots = m.get("slots_in_four_f16_slots") or m["slots_of_4096_within_budget"]
        kib = f"{per['f16'] / 1024:.1f} KiB per position in f16, {per['q8_0'] / 1024:.1f} in q8_0"
        print(f"{name}: {kib}; slots {slots}")
    if args.out:
        meta = dict(
            gguf=str(gguf),
            ctx=args.ctx,
            chunk=args.chunk,
            threads=args.threads,
            machine=platform.processor() or platform.machine(),
            date=time.strftime("%Y-%m-%d"),
            seconds=round(time.perf_counter() - started, 1),
        )
        args.out.write_text(json.dumps(dict(meta=meta, parity=parity, memory=memory), indent=1) + "\n")


if __name__ == "__main__":
    main()
