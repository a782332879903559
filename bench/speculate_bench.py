"""One stream with prompt-lookup speculation on and off, side by side in one run on one GGUF: grounded tasks (rewrite a
given text of ~1 000 tokens, edit a given code file), where the reply repeats its input and drafts are accepted, and
free chat, where speculation must not cost anything.

    python bench/speculate_bench.py [--model copy|quickstart | --gguf FILE] [--speculate 4] [--max-tokens 256]
                                    [--ctx 2048] [--gpu-layers -1] [--out bench/speculate_results.json]

Each mode starts its own `python -m serve` with one slot (--speculate N or none); every task is one greedy streamed
request of --max-tokens new tokens (end-of-turn ignored, so both modes write the same number), run twice, the second
timed. Reported per task: tokens/s off and on, the ratio, whether the texts are identical, and the drafted and
accepted tokens /metrics counted during the task, and how much of the reply (off) is a copy of its prompt: the share
of its tokens in runs of COPY_RUN or more that repeat the prompt in order, so a reader sees whether the grounded tasks
were grounded. The model served, unless --gguf names one: `copy` (default), the embedded tiny model fine-tuned to
repeat what it is asked to rewrite or edit (bench/copy_model.py), as an instruct model does; `quickstart`, the GGUF of
a short training run of the embedded model, which does not copy. Either is made (and cached) first; the embedded
model's trained context is 512, so --ctx (2 048 by default) lets the long prompts in.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aegis import digest, llamacpp  # noqa: E402
from bench.common import chat_request  # noqa: E402
from tests.support.serving import Server, exported_run, find_gguf  # noqa: E402

MODEL = "bench"
COPY_RUN = 8  # a reply token counts as copied inside a run of this many tokens repeating the prompt in order
FREE = [
    "こんにちは。自己紹介をしてください。",
    "日本の四季について説明してください。",
    "おすすめの本を三冊教えてください。",
]


def grounded_tasks(chars: int) -> dict[str, str]:
    """Prompts whose reply should repeat their input: a text to rewrite, a code file to edit (both shipped with the
    repository, so every run reads the same)."""
    prose = (REPO / "aegis" / "corpus" / "prose_eval.txt").read_text(encoding="utf-8")[:chars]
    code = (REPO / "aegis" / "schedule.py").read_text(encoding="utf-8")[:chars]
    return {
        "rewrite": f"次の文章を、内容を変えずに丁寧な言葉で書き直してください。\n\n{prose}",
        "code edit": "次のコードの関数名 phase を phase_name に変えて、ファイル全体を書き直してください。"
        f"\n\n```python\n{code}\n```",
    }


def counters(base: str) -> dict[str, float]:
    """The engine's counters: tokens drafted and accepted, decode steps, and its thread's seconds in steps and in
    llama_decode (with its batch and logits)."""
    text = httpx.get(base + "/metrics", timeout=10).text

    def total(name: str, labels: str = "[^}]*") -> float:
        return sum(float(m) for m in re.findall(rf"^{name}_total{{{labels}}} (\S+)$", text, re.M))

    return {
        "drafted": total("aegis_draft_tokens"),
        "accepted": total("aegis_draft_accepted_tokens"),
        "steps": total("aegis_decode_steps"),
        "step_s": total("aegis_engine_seconds", '[^}]*part="step"[^}]*'),
        "decode_s": total("aegis_engine_seconds", '[^}]*part="decode"[^}]*'),
    }


def one(base: str, prompt: str, max_tokens: int) -> tuple[str, float, int]:
    """One streamed greedy request: its text, seconds from the first piece to the last, tokens written."""
    payload = chat_request(MODEL, prompt, max_tokens, ignore_eos=True)
    text, first, tokens = [], None, max_tokens
    with httpx.stream("POST", base + "/v1/chat/completions", json=payload, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    return "".join(text), time.perf_counter() - (first or time.perf_counter()), tokens


def copy_share(vocab, prompt: str, reply: str) -> float:
    """The share of the reply's tokens that repeat the prompt in order, in runs of COPY_RUN tokens or more (difflib's
    matching blocks: a reply that loops on a short piece of the prompt counts that piece once)."""

    def ids(text: str) -> list[int]:
        return vocab.tokenize(text.encode(), add_bos=False, special=False)

    p, r = ids(prompt), ids(reply)
    blocks = difflib.SequenceMatcher(None, p, r, autojunk=False).get_matching_blocks()
    return round(sum(b.size for b in blocks if b.size >= COPY_RUN) / len(r), 3) if r else 0.0


def run_mode(gguf: Path, speculate: int, tasks: dict[str, str], args) -> dict:
    log = args.logs / f"speculate-{speculate}.log"
    args.logs.mkdir(parents=True, exist_ok=True)
    server = Server(
        "--model",
        f"{MODEL}={gguf}",
        "--parallel",
        "1",
        "--ctx-size",
        str(args.ctx),
        "--n-gpu-layers",
        str(args.gpu_layers),
        "--log-level",
        "warning",
        *(["--speculate", str(speculate)] if speculate else []),
        *([] if digest.sidecar(gguf).is_file() else ["--no-verify"]),
        log_path=log,
    )
    out = {}
    with server:
        for name, prompt in tasks.items():
            one(server.url, prompt, args.max_tokens)  # warm-up (and the prompt's first read)
            before = counters(server.url)
            text, seconds, tokens = one(server.url, prompt, args.max_tokens)
            after = counters(server.url)
            out[name] = {
                "text": text,
                "seconds": seconds,
                "tokens": tokens,
                "tokens_per_s": (tokens - 1) / seconds if seconds > 0 else 0.0,
                **{k: after[k] - before[k] for k in after},
            }
    return out


def rows(off: dict, on: dict, copied: dict) -> list[dict]:
    out = []
    for name in off:
        a, b = off[name], on[name]
        out.append(
            {
                "task": name,
                "off_tokens_per_s": round(a["tokens_per_s"], 1),
                "on_tokens_per_s": round(b["tokens_per_s"], 1),
                "ratio": round(b["tokens_per_s"] / a["tokens_per_s"], 3) if a["tokens_per_s"] else None,
                "identical": a["text"] == b["text"],
                "drafted": b["drafted"],
                "accepted": b["accepted"],
                "copy_share_off": copied[name],
                # where the time went, per decode step: the steps, the engine thread's ms in a step and in
                # llama_decode, and the ms of the request's wall time per step (the rest: outside the engine's steps)
                "engine": {
                    mode: {
                        "steps": d["steps"],
                        "step_ms": round(1e3 * d["step_s"] / d["steps"], 3) if d["steps"] else None,
                        "decode_ms": round(1e3 * d["decode_s"] / d["steps"], 3) if d["steps"] else None,
                        "wall_ms": round(1e3 * d["seconds"] / d["steps"], 3) if d["steps"] else None,
                    }
                    for mode, d in (("off", a), ("on", b))
                },
            }
        )
    return out


def markdown(table: list[dict]) -> str:
    lines = [
        "| task | tokens/s off | tokens/s on | on / off | same text | drafted | accepted | reply copied |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['task']} | {r['off_tokens_per_s']} | {r['on_tokens_per_s']} | {r['ratio']} | "
            f"{'yes' if r['identical'] else 'NO'} | {r['drafted']:.0f} | {r['accepted']:.0f} | "
            f"{r['copy_share_off']:.0%} |"
        )
    return "\n".join(lines)


def served_gguf(model: str) -> Path:
    """The GGUF --model names, made and cached in the temp directory on first use."""
    if model == "copy":
        from bench import copy_model

        return copy_model.ensure(Path(tempfile.gettempdir()) / "aegis-copy-model")
    return find_gguf(exported_run(Path(tempfile.gettempdir()) / "aegis-serve"), "q8_0")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/speculate_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["copy", "quickstart"], default="copy", help="what to serve without --gguf")
    ap.add_argument("--gguf", type=Path, help="GGUF to serve (instead of --model)")
    ap.add_argument("--speculate", type=int, default=4, help="tokens drafted per step when on")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=2048, help="served context (the grounded prompts need ~1 100)")
    ap.add_argument("--chars", type=int, default=1400, help="characters of text and code in the grounded prompts")
    ap.add_argument("--gpu-layers", type=int, default=-1, help="-1: all")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "speculate_results.json")
    ap.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "speculate-bench-logs")
    args = ap.parse_args(argv)
    gguf = args.gguf or served_gguf(args.model)
    tasks = {**grounded_tasks(args.chars), **{f"free chat {i + 1}": p for i, p in enumerate(FREE)}}
    off = run_mode(gguf, 0, tasks, args)
    on = run_mode(gguf, args.speculate, tasks, args)
    vocab = llamacpp.open_vocab(gguf)
    table = rows(off, on, {name: copy_share(vocab, tasks[name], off[name]["text"]) for name in tasks})
    vocab.close()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "load_before": os.getloadavg(),
        "gguf": gguf.name,
        "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "speculate": args.speculate,
        "max_tokens": args.max_tokens,
        "ctx": args.ctx,
        "rows": table,
        "texts": {name: {"off": off[name]["text"], "on": on[name]["text"]} for name in tasks},
    }
    args.out.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
