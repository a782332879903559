"""The logits of the same token ids from both sides, transformers (float32) and llama.cpp (every position, F32 KV
cache so that f32 parity measures the file, not the cache's rounding), and the figures that compare them: top-1
agreement, mean and max KL(HF‖GGUF), max |Δlogit|. export/parity.py judges these figures against its thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aegis import llamacpp

from .files import ExportError

# Two tokens whose HF logits are within TIE of each other (probabilities within ~10 %) count as a tie for top-1.
TIE = 0.1


def _kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p = p_logits.astype(np.float64)
    q = q_logits.astype(np.float64)
    lp = p - p.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q - q.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(-1)


def metrics(hf: np.ndarray, gg: np.ndarray) -> dict:
    """top1: strict argmax agreement. top1_tie: the GGUF's pick is HF's pick or within TIE of HF's best logit,
    i.e. HF itself could not tell the two apart (a small model has many such near-ties, and any rounding flips
    them; the thresholds apply to this one)."""
    kl = _kl_rows(hf, gg)
    pick = gg.argmax(-1)
    gap = hf.max(-1) - np.take_along_axis(hf, pick[:, None], -1)[:, 0]
    return {
        "tokens": int(hf.shape[0]),
        "top1": float((hf.argmax(-1) == pick).mean()),
        "top1_tie": float((gap <= TIE).mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "max_abs": float(np.abs(hf - gg).max()),
    }


def open_gguf(path: Path, n_ctx: int, threads: int | None, extra_bufts: bool):
    f32 = llamacpp.runtime().GGML_TYPE_F32
    return llamacpp.open_model(
        path,
        extra_bufts=extra_bufts,
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 512),
        n_ubatch=min(n_ctx, 512),
        logits_all=True,
        verbose=False,
        n_threads=threads,
        n_threads_batch=threads,
        type_k=f32,
        type_v=f32,
        seed=0,
    )


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def measure(model, gguf_path: Path, groups: list, threads: int, extra_bufts: bool, also=None):
    """(metrics per prompt, metrics over all of them, what `also` returned or None): each prompt's logits from
    transformers and from llama.cpp in its group's context. `also(llm)` runs once, on the first llama.cpp model
    opened, for a check that needs llama.cpp's own tokenizer and template."""
    import torch

    dev = next(model.parameters()).device
    per, hf_all, gg_all, extra = {}, [], [], None
    for i, (n_ctx, group) in enumerate(groups):
        llm = open_gguf(gguf_path, n_ctx, threads, extra_bufts)
        try:
            for label, ids in group:
                with torch.no_grad():
                    hf = model(input_ids=torch.tensor([ids], device=dev)).logits[0].float().cpu().numpy()
                gg = gguf_logits(llm, ids)
                if gg.shape != hf.shape:
                    raise ExportError(
                        f"{gguf_path}: llama.cpp gives logits of shape {gg.shape}, transformers "
                        f"{hf.shape} (vocabulary size differs)"
                    )
                per[label] = {**metrics(hf, gg), "n_ctx": n_ctx}
                hf_all.append(hf)
                gg_all.append(gg)
            if also is not None and i == 0:
                extra = also(llm)
        finally:
            llm.close() if hasattr(llm, "close") else None
            del llm
    return per, metrics(np.concatenate(hf_all), np.concatenate(gg_all)), extra
