"""Can the model hold a short conversation in Japanese? Greedy replies to every held-out user turn, scored.

    python -m train.chat_quality                                   the embedded tiny Phi-3 as built
    python -m train.chat_quality --checkpoint runs/quickstart/final [--json] [--out FILE]

For each assistant turn of the held-out chats (train/corpus/chat_eval.jsonl; never trained on), the model gets the
conversation up to that turn (system prompt, earlier user turns and the reference's earlier replies) and answers
greedily, at most 96 new tokens. Targets:

- Japanese: in every reply at least 90 % of the counted characters are Japanese (`japanese_ratio`);
- ending: at least 80 % of replies end with <|end|> inside the limit;
- no loops: no reply holds any run of 4 tokens more than twice (`most_repeated`);
- perplexity of the reference replies' tokens (assistant turns only, as in training): with --checkpoint, the
  checkpoint (LoRA + soul) against its base in the same quantization, at most 5 % worse.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from aegis import atomic, checkpoint, cli
from aegis.cli import setting
from aegis.pretrained import pretrained
from aegis.tiny import ensure

from . import data

HELD_OUT = "embedded:chat_eval.jsonl"
MAX_NEW_TOKENS = 96
# greedy decoding: the model's own sampling defaults (its generation config) are left out
GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
END = "<|end|>"
JAPANESE_MIN, ENDED_MIN, REPEAT_MAX, PERPLEXITY_MAX = 0.90, 0.80, 2, 1.05
NGRAM = 4

# Japanese script and punctuation, as code point ranges (inclusive).
JAPANESE = (
    (0x3001, 0x303F),  # CJK symbols and punctuation: 、。「」『』【】〜々〆〇 ...
    (0x3041, 0x309F),  # hiragana
    (0x30A0, 0x30FF),  # katakana, ・ and ー
    (0x31F0, 0x31FF),  # katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK ideographs, extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF01, 0xFF0F),
    (0xFF1A, 0xFF20),
    (0xFF3B, 0xFF40),
    (0xFF5B, 0xFF65),  # full-width punctuation
    (0xFF66, 0xFF9F),  # half-width katakana
    (0x2025, 0x2026),  # ‥ …
)
# Counted neither way: Japanese writes numbers in Arabic digits, and a worked sum ("480×0.45=216なので") is
# ordinary Japanese. Full-width digits (０-９) count the same as ASCII ones. Latin letters count against.
NEUTRAL = set("0123456789０１２３４５６７８９.,+-−×÷=±%²√/")


def is_japanese(ch: str) -> bool:
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in JAPANESE)


def japanese_ratio(text: str) -> float:
    """Japanese characters / counted characters. Whitespace, digits and the signs of numbers and sums (NEUTRAL)
    are not counted; a text with nothing counted (empty, only digits) scores 0: it says nothing in Japanese."""
    counted = [ch for ch in text if not ch.isspace() and ch not in NEUTRAL]
    return sum(map(is_japanese, counted)) / len(counted) if counted else 0.0


def most_repeated(ids: list[int], n: int = NGRAM) -> int:
    """How often the most frequent run of `n` consecutive tokens occurs (overlapping runs count); 0 if shorter."""
    counts = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return max(counts.values(), default=0)


def held_out_turns(path: Path) -> list[tuple[list[dict], str]]:
    """(conversation up to an assistant turn, that turn's reference reply) for every assistant turn."""
    turns = []
    for kind, msgs in data.records(path):
        if kind != "messages":
            continue
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                turns.append((msgs[:i], m["content"]))
    if not turns:
        raise data.DataError(f"{path}: no assistant turns to score")
    return turns


@torch.no_grad()
def greedy_reply(model, tokenizer, messages: list[dict], stops: list[int], max_new_tokens: int) -> list[int]:
    """The generated token ids, the stop token included when one was produced."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        **GREEDY,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=stops[0],
        use_cache=True,
    )
    return out[0, ids.shape[1] :].tolist()


def score_reply(tokenizer, new_ids: list[int], stops: list[int], end_id: int) -> dict:
    ended = bool(new_ids) and new_ids[-1] == end_id
    body = new_ids[:-1] if new_ids and new_ids[-1] in stops else new_ids
    text = tokenizer.decode(body, skip_special_tokens=True).strip()
    return {
        "reply": text,
        "tokens": len(new_ids),
        "ended": ended,
        "japanese": japanese_ratio(text),
        "most_repeated": most_repeated(body),
    }


def replies(model, tokenizer, turns, max_new_tokens: int = MAX_NEW_TOKENS, log=print) -> list[dict]:
    from .chat import stop_ids

    stops = stop_ids(model, tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(END)
    rows = []
    for n, (messages, reference) in enumerate(turns, 1):
        row = score_reply(tokenizer, greedy_reply(model, tokenizer, messages, stops, max_new_tokens), stops, end_id)
        rows.append({"prompt": messages[-1]["content"], "reference": reference, **row})
        if n % 10 == 0:
            log(f"  {n}/{len(turns)} replies")
    return rows


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "replies": n,
        "japanese_min": min(r["japanese"] for r in rows),
        "japanese_mean": sum(r["japanese"] for r in rows) / n,
        "japanese_ok": sum(r["japanese"] >= JAPANESE_MIN for r in rows) / n,
        "ended": sum(r["ended"] for r in rows) / n,
        "most_repeated": max(r["most_repeated"] for r in rows),
        "looping": sum(r["most_repeated"] > REPEAT_MAX for r in rows),
        "mean_tokens": sum(r["tokens"] for r in rows) / n,
    }


def targets(result: dict) -> dict[str, bool]:
    s = result["summary"]
    out = {"japanese": s["japanese_ok"] == 1.0, "ended": s["ended"] >= ENDED_MIN, "no_loops": s["looping"] == 0}
    ppl = result.get("perplexity", {})
    if "ratio_to_base" in ppl:
        out["perplexity"] = ppl["ratio_to_base"] <= PERPLEXITY_MAX
    return out


def base_perplexity(model, tokenizer, sources: list[str], max_length: int = 512) -> dict:
    from .eval import figures, loss_over, windows

    seqs = windows(data.load(sources, tokenizer, log=lambda *_: None), max_length)
    return figures(*loss_over(model, seqs, tokenizer.pad_token_id))


def evaluate(
    checkpoint_dir: Path | None, source: str = HELD_OUT, max_new_tokens: int = MAX_NEW_TOKENS, log=print
) -> dict:
    """Replies and perplexity of the embedded base (checkpoint_dir None) or of a training checkpoint."""
    turns = held_out_turns(data.resolve(source)[0])
    if checkpoint_dir is None:
        from transformers import AutoTokenizer

        path = ensure(log=log)
        model = pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        ppl = {"base": base_perplexity(model, tokenizer, [source])}
        what = {"model": str(path), "quantization": "none"}
    else:
        from .eval import Evaluator

        ev = Evaluator(checkpoint_dir)
        model, tokenizer = ev.model, ev.tokenizer
        res = ev.run([source], variants=("checkpoint", "base"), log=lambda *_: None)["results"]
        ppl = {
            "checkpoint": res["checkpoint"],
            "base": res["base"],
            "ratio_to_base": res["checkpoint"]["ratio_to_base"],
        }
        what = {"model": str(checkpoint_dir), "quantization": ev.quantization, "gate": float(ev.soul.gate())}
    rows = replies(model, tokenizer, turns, max_new_tokens, log)
    result = {
        **what,
        "data": source,
        "max_new_tokens": max_new_tokens,
        "summary": summary(rows),
        "perplexity": ppl,
        "rows": rows,
    }
    result["targets"] = targets(result)
    return result


def report(result: dict, show: int = 3) -> str:
    s, ppl = result["summary"], result["perplexity"]

    def ok(name: str) -> str:
        return "" if name not in result["targets"] else " ok" if result["targets"][name] else " MISSED"

    lines = [
        f"{result['model']} on {result['data']}: {s['replies']} greedy replies (at most "
        f"{result['max_new_tokens']} new tokens)",
        f"  Japanese characters   min {s['japanese_min']:.1%}  mean {s['japanese_mean']:.1%}  replies at "
        f">= {JAPANESE_MIN:.0%}: {s['japanese_ok']:.1%}{ok('japanese')}",
        f"  ended with {END}     {s['ended']:.1%} (target >= {ENDED_MIN:.0%}){ok('ended')}  mean length "
        f"{s['mean_tokens']:.1f} tokens",
        f"  4-token runs          most repeated {s['most_repeated']}x; replies with one over "
        f"{REPEAT_MAX}x: {s['looping']}{ok('no_loops')}",
    ]
    for name in ("base", "checkpoint"):
        if name in ppl:
            lines.append(
                f"  perplexity ({name:<10}) {ppl[name]['perplexity']:.3f} over {ppl[name]['tokens']} assistant tokens"
            )
    if "ratio_to_base" in ppl:
        lines.append(
            f"  checkpoint / base     {ppl['ratio_to_base']:.4f} (target <= {PERPLEXITY_MAX})" + ok("perplexity")
        )
    for row in result["rows"][:show]:
        lines += [f"  > {row['prompt']}", f"    {row['reply']}"]
    return "\n".join(lines)


@dataclass
class Args:
    """Can the model hold a short conversation in Japanese? Greedy replies to every held-out user turn, scored for
    Japanese, for ending inside the limit and for loops; with --checkpoint, its perplexity against its base too."""

    checkpoint: Path | None = setting(
        None,
        "RUN_DIR/final or RUN_DIR/checkpoints/step_N (default: the embedded tiny Phi-3 itself)",
        metavar="DIR",
        env="AEGIS_CHECKPOINT",
    )
    data: str = setting(HELD_OUT, "held-out chats", metavar="SOURCE")
    max_new_tokens: int = setting(MAX_NEW_TOKENS, "the longest reply, in tokens", parse=cli.bounded(int, 1))
    show: int = setting(3, "print this many prompts and replies", parse=cli.bounded(int, 0))
    json: bool = setting(False, "print the result as JSON")
    out: Path | None = setting(None, "also write the JSON to this file", metavar="FILE")


def score(args: Args) -> None:
    try:
        result = evaluate(args.checkpoint, args.data, args.max_new_tokens, log=lambda m: print(m, file=sys.stderr))
    except (checkpoint.CheckpointError, data.DataError, FileNotFoundError, ValueError, OSError) as e:
        raise cli.UsageError(str(e).splitlines()) from None  # the checkpoint or data the user named
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        atomic.write_text(args.out, text + "\n")
    print(text if args.json else report(result, args.show))


def main(argv: list[str] | None = None) -> int:
    return cli.main(
        lambda: score(cli.parse(Args, sys.argv[1:] if argv is None else argv, prog="python -m train.chat_quality"))
    )


if __name__ == "__main__":
    sys.exit(main())
