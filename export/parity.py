"""Parity of a GGUF with the merged HF model it came from, measured with llama.cpp (llama-cpp-python).

Logits: the same token ids go through transformers (float32) and llama.cpp (logits for every position,
export/logits.py); top-1 agreement, mean KL(HF‖GGUF) and max |Δlogit| are judged against thresholds by type. Both
sides get identical ids, so this measures the weights and the graph, not the tokenizer.

LongRoPE: transformers switches to the long factors when a sequence is longer than the original context; llama.cpp
switches by the context size it was created with. Short prompts therefore run in the context the server opens the
file with by default (aegis.gguf_context.Context: a LongRoPE model's original context), and the long prompt in a larger
one, so both sides use the same factors.

Replies: each prompt's first GEN_TOKENS greedy tokens, decoded as the server decodes a request in its default
context (aegis.decoding.greedy), are recorded in parity.json; `python -m serve` with default settings answers those
prompts at temperature 0 with exactly those tokens (tests/test_served_parity.py).

Template: the chat rendered from the GGUF's own template and tokenized by llama.cpp must give exactly the ids the
HF tokenizer gives for the chat rendered with its chat template."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from aegis import chat_template, decoding, gguf_context, llamacpp
from aegis.atomic import write_json
from aegis.pretrained import pretrained

from . import logits, prompts
from .files import ExportError
from .logits import TIE

PARITY_FILE = "parity.json"
# Per type: minimum top-1 agreement (near-ties counted, see metrics), maximum mean KL(HF‖GGUF) in nats, maximum
# |Δlogit| (None: not bounded). Set so that a faithful export of even the tiny embedded model passes (its 128-wide
# rows give quantization little to average over), while a structural mistake (a wrong q/k row order, wrong rope
# factors, a missing soul) drops top-1 agreement far below them and fails (tests/test_export_tied.py shows one).
THRESHOLDS = {
    "f32": {"top1": 0.999, "kl": 1e-5, "max_abs": 5e-3},
    "f16": {"top1": 0.99, "kl": 1e-3, "max_abs": None},
    "bf16": {"top1": 0.98, "kl": 5e-3, "max_abs": None},
    # q8_0: a real 135 M model (SmolLM2, reports/real_model.md) keeps 97.6 % top-1 (mean KL 8e-3) in q8_0, whether
    # gguf-py or llama.cpp's own quantizer makes the file; small, deep models lose more to 8-bit rounding
    "q8_0": {"top1": 0.97, "kl": 1e-2, "max_abs": None},
    "q6_k": {"top1": 0.9, "kl": 5e-2, "max_abs": None},
    **{t: {"top1": 0.85, "kl": 0.1, "max_abs": None} for t in ("q5_0", "q5_1", "q5_k_s", "q5_k_m")},
    **{t: {"top1": 0.75, "kl": 0.25, "max_abs": None} for t in ("q4_0", "q4_1", "q4_k_s", "q4_k_m")},
    **{t: {"top1": 0.6, "kl": 0.5, "max_abs": None} for t in ("q3_k_s", "q3_k_m", "q3_k_l")},
    "q2_k": {"top1": 0.4, "kl": 1.0, "max_abs": None},
}
GEN_TOKENS = 32


def _render_gguf_template(llm, messages) -> str:
    """Render the chat with the template stored in the GGUF, by the renderer the server uses."""
    meta = llm.metadata
    template = meta.get("tokenizer.chat_template")
    if not template:
        raise ExportError("the GGUF has no tokenizer.chat_template")

    def token(key):
        tid = meta.get(key)
        return llm.detokenize([int(tid)], special=True).decode("utf-8") if tid is not None else ""

    return chat_template.render(
        template,
        messages,
        {"bos_token": token("tokenizer.ggml.bos_token_id"), "eos_token": token("tokenizer.ggml.eos_token_id")},
    )


def template_parity(llm, tokenizer) -> dict:
    hf_text = prompts.chat_text(tokenizer)
    hf_ids = prompts.encode(tokenizer, hf_text, templated=True)
    gg_text = _render_gguf_template(llm, prompts.CHAT)
    gg_ids = llm.tokenize(gg_text.encode("utf-8"), add_bos=False, special=True)
    first = next((i for i, (a, b) in enumerate(zip(hf_ids, gg_ids)) if a != b), min(len(hf_ids), len(gg_ids)))
    ok = hf_text == gg_text and list(hf_ids) == list(gg_ids)
    out = {"ok": ok, "text_equal": hf_text == gg_text, "hf_tokens": len(hf_ids), "gguf_tokens": len(gg_ids)}
    if not ok:
        out["first_difference"] = {
            "index": first,
            "hf": tokenizer.convert_ids_to_tokens(hf_ids[first : first + 5]),
            "gguf": [llm.detokenize([t], special=True).decode("utf-8", "replace") for t in gg_ids[first : first + 5]],
        }
    return out


def replies(gguf_path: Path, items: list[tuple[str, list[int]]], n_ctx: int, threads: int, extra_bufts: bool) -> dict:
    """{label: {"prompt", "ids", "text"}}: each prompt's first GEN_TOKENS greedy tokens as the server decodes them
    in its default context (ids), and their text up to the first end-of-generation token."""
    got = decoding.greedy(gguf_path, [ids for _, ids in items], GEN_TOKENS, n_ctx, extra_bufts, threads)
    return {label: {"prompt": list(ids), "ids": r.ids, "text": r.text} for (label, ids), r in zip(items, got)}


def check(
    model_dir: Path,
    gguf_path: Path,
    out_type: str,
    threads: int | None = None,
    device: str = "auto",
    log=print,
    name: str | None = None,
) -> dict:
    """Measure parity; returns the report (with "passed"). Raises ExportError only for unusable input."""
    import torch
    from transformers import AutoTokenizer

    start = time.time()
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    # A crash inside llama.cpp would take this process with it: a child loads and decodes the file first.
    loader = llamacpp.probe(gguf_path, threads=threads, log=log, name=name)
    rule = gguf_context.context(gguf_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    model = pretrained(model_dir, dtype=torch.float32, device_map={"": dev})
    model.eval()
    groups, sampled, longrope = _prompt_groups(tok, rule)
    template_check = (lambda llm: template_parity(llm, tok)) if tok.chat_template else None
    per, overall, template = logits.measure(model, gguf_path, groups, threads, loader.extra_bufts, template_check)
    del model
    said = replies(gguf_path, sampled, rule.default, threads, loader.extra_bufts)
    limits = THRESHOLDS.get(out_type, THRESHOLDS["q2_k"])
    failures = _failures(overall, limits, template)
    return {
        "gguf": gguf_path.name,
        "type": out_type,
        "passed": not failures,
        "failures": failures,
        "thresholds": limits,
        "overall": overall,
        "prompts": per,
        "template": template,
        "sample": {k: said[k]["text"] for k in ("prose", "chat") if k in said},
        "replies": said,
        "served_context": rule.default,
        "context_length": rule.length,
        "original_context": rule.original,
        "longrope": longrope,
        "extra_bufts": loader.extra_bufts,
        "loader_note": loader.note,
        "seconds": round(time.time() - start, 1),
    }


def _prompt_groups(tok, rule) -> tuple[list, list, bool]:
    """([(n_ctx, [(label, ids)])], the prompts whose replies are recorded, whether the long factors are checked).
    The short prompts run in the context the server uses by default; for LongRoPE one prompt past the original
    context runs in a context large enough that llama.cpp takes the long factors as transformers does for it."""
    items = [(f"short{i}", prompts.encode(tok, t)) for i, t in enumerate(prompts.SHORT)]
    if tok.chat_template:
        items.append(("chat", prompts.encode(tok, prompts.chat_text(tok), templated=True)))
    longrope = bool(rule.original and rule.length and rule.length > rule.original)
    groups = [(rule.default, items)]
    if longrope:
        ids = prompts.long_ids(tok, rule.original)
        groups.append((min(rule.length, 64 * math.ceil((len(ids) + 1) / 64)), [("long", ids)]))
    sampled = [("prose", prompts.encode(tok, prompts.SHORT[1][:8])), *items]
    return groups, sampled, longrope


def _failures(overall: dict, limits: dict, template: dict | None) -> list[str]:
    """What breaks the type's bounds, each in words; empty when parity passes."""
    failures = []
    if overall["top1_tie"] < limits["top1"]:
        failures.append(f"top-1 agreement {overall['top1_tie']:.2%} (ties within {TIE} counted) < {limits['top1']:.0%}")
    if overall["kl_mean"] > limits["kl"]:
        failures.append(f"mean KL {overall['kl_mean']:.3g} > {limits['kl']:g}")
    if limits["max_abs"] is not None and overall["max_abs"] > limits["max_abs"]:
        failures.append(f"max |Δlogit| {overall['max_abs']:.3g} > {limits['max_abs']:g}")
    if template is not None and not template["ok"]:
        failures.append("chat template tokens differ between llama.cpp and the HF tokenizer")
    return failures


def table(report: dict) -> str:
    rows = [("prompt", "tokens", "n_ctx", "top-1", "top-1 (ties)", "mean KL", "max |Δlogit|")]
    for label, m in [*report["prompts"].items(), ("all", report["overall"])]:
        rows.append(
            (
                label,
                str(m["tokens"]),
                str(m.get("n_ctx", "")),
                f"{m['top1']:.2%}",
                f"{m['top1_tie']:.2%}",
                f"{m['kl_mean']:.2e}",
                f"{m['max_abs']:.3g}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += verdict(report)
    verdict_line = "PASS" if report["passed"] else "FAIL: " + "; ".join(report["failures"])
    lines.append(f"{report['gguf']} ({report['type']}): {verdict_line}")
    return "\n".join(lines)


def verdict(report: dict) -> list[str]:
    """Each figure in words: whether it is fine, and why."""
    t = report.get("template")
    template = (
        "none in the model"
        if t is None
        else f"fine, the GGUF's renders the same {t['hf_tokens']} tokens as transformers'"
        if t["ok"]
        else "DIFFERENT from transformers' (see first_difference)"
    )
    return [*_logit_figures(report), f"chat template: {template}", *_context_lines(report)]


def _logit_figures(report: dict) -> list[str]:
    """Top-1 agreement, mean KL and max |Δlogit| in words, each against the type's limit."""
    o, lim, kind = report["overall"], report["thresholds"], report["type"]
    out = [
        f"top-1 agreement: the GGUF picks transformers' own next token at {o['top1']:.1%} of {o['tokens']} "
        f"positions, and {o['top1_tie']:.1%} counting near-ties (transformers' best two within {TIE} logit: the "
        f"model itself cannot tell them apart, so any rounding flips some); "
        + (
            f"fine, the limit for {kind} is {lim['top1']:.0%} counting near-ties"
            if o["top1_tie"] >= lim["top1"]
            else f"TOO LOW: {kind} needs {lim['top1']:.0%} counting near-ties"
        ),
        f"mean KL(HF‖GGUF): {o['kl_mean']:.2e} nats per position; "
        + (
            f"fine, the limit for {kind} is {lim['kl']:g}"
            if o["kl_mean"] <= lim["kl"]
            else f"TOO HIGH: {kind} allows {lim['kl']:g}"
        ),
    ]
    if lim["max_abs"] is None:
        out.append(
            f"max |Δlogit|: {o['max_abs']:.3g}; not bounded for {kind} (its rounding moves single logits; the "
            f"two figures above bound what the model says)"
        )
    else:
        out.append(
            f"max |Δlogit|: {o['max_abs']:.3g}; "
            + (
                f"fine, the limit for {kind} is {lim['max_abs']:g}"
                if o["max_abs"] <= lim["max_abs"]
                else f"TOO HIGH: {kind} allows {lim['max_abs']:g}"
            )
        )
    return out


def _context_lines(report: dict) -> list[str]:
    """The context the short prompts ran in, and the replies recorded there; none for reports written before the
    served context was recorded."""
    served, orig, length = report.get("served_context"), report.get("original_context"), report.get("context_length")
    if served is None:
        return []
    why = (
        f"this LongRoPE model's original context of {orig}, in which llama.cpp applies the short rope factors "
        f"as transformers does for prompts of up to {orig} tokens (the long prompt ran in a larger context to "
        f"check the long factors)"
        if orig
        else f"the model's context length of {length}, at most {gguf_context.CONTEXT_CAP}"
    )
    n = len(report.get("replies") or {})
    return [
        f"context: the short prompts ran in {served} positions, what `python -m serve` opens this file "
        f"with by default: {why}; its context length is {length}",
        f"replies: {n} prompts' first {GEN_TOKENS} greedy tokens, decoded as the server decodes them in "
        f"{served} positions, recorded in {PARITY_FILE}; the server gives the same at temperature 0",
    ]


def record(directory: Path, report: dict) -> Path:
    """Add `report` to parity.json beside the GGUF (one entry per file name), written atomically."""
    path = Path(directory) / PARITY_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[report["gguf"]] = report
    write_json(path, data)
    return path
