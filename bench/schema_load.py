"""Whether constrained requests slow the others, and how long a grammar takes to build.

    python bench/schema_load.py load --gguf FILE [--clients 16] [--constrained 8] [--requests 2] [--max-tokens 256]
    python bench/schema_load.py build [--gguf FILE] [--cache DIR]

load: one server (`python -m serve --parallel CLIENTS`), all layers on the GPU when there is one. Three rounds on
it, each of CLIENTS concurrent clients streaming --requests greedy chat requests of --max-tokens tokens: all
unconstrained (ignore_eos, as in serve_bench.py), then CONSTRAINED of them with a JSON schema (response_format
json_schema; each schema needs more than --max-tokens tokens, so every reply ends by length as the unconstrained ones
do), then all unconstrained again. Reported: aggregate tokens/s of each round and the mixed round over the mean of
the two unconstrained ones.

build: every schema of the JSON Schema Test Suite the server accepts (the suite as bench/schema_coverage.py gets it),
timed from the schema to the grammar engine's matcher over the GGUF's vocabulary, as a request pays for it on its
own thread: the server's check and GBNF (serve.structured.schema_grammar), then the compile
(LlamaCppBackend.compile_grammar; the decode thread only copies the result). p50, p99 and the slowest, per part and
together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serve_bench import MODEL, OURS, one_request, server_for  # noqa: E402

from bench.common import chat_request, run_clients  # noqa: E402

ROW = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "kind", "note"],
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "kind": {"enum": ["order", "refund", "question"]},
        "note": {"type": "string", "maxLength": 40},
    },
}
SCHEMAS = [  # app-like shapes, each long enough that max_tokens ends the reply
    {"type": "array", "items": ROW, "minItems": 200},
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["log"],
        "properties": {
            "log": {
                "type": "array",
                "minItems": 200,
                "items": {
                    "type": "object",
                    "required": ["at", "ok"],
                    "additionalProperties": False,
                    "properties": {"at": {"type": "string", "format": "date-time"}, "ok": {"type": "boolean"}},
                },
            }
        },
    },
    {
        "type": "array",
        "minItems": 200,
        "items": {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["shape", "r"],
                    "additionalProperties": False,
                    "properties": {"shape": {"const": "circle"}, "r": {"type": "number", "minimum": 0, "maximum": 100}},
                },
                {
                    "type": "object",
                    "required": ["shape", "w", "h"],
                    "additionalProperties": False,
                    "properties": {"shape": {"const": "rect"}, "w": {"type": "integer"}, "h": {"type": "integer"}},
                },
            ]
        },
    },
]
PROMPT = "受注の記録を JSON で書いてください。"


def payload(i: int, constrained: bool, max_tokens: int) -> dict:
    if not constrained:
        return chat_request(MODEL, PROMPT, max_tokens, ignore_eos=True)
    schema = {"name": f"s{i}", "schema": SCHEMAS[i % len(SCHEMAS)]}
    return chat_request(MODEL, PROMPT, max_tokens, response_format={"type": "json_schema", "json_schema": schema})


async def round_(base: str, clients: int, constrained: int, requests: int, max_tokens: int) -> dict:
    url = base + "/v1/chat/completions"

    async def request(client: httpx.AsyncClient, i: int, k: int) -> dict:
        return await one_request(client, url, payload(i + k, i < constrained, max_tokens))

    results, wall, _ = await run_clients(request, clients, requests, 1800)
    flat = [(i < constrained, r) for i, rs in enumerate(results) for r in rs]
    tokens = sum(r["tokens"] for _, r in flat)
    part = lambda c: [r["tokens"] / r["total"] for k, r in flat if k == c]  # noqa: E731
    return {
        "constrained_clients": constrained,
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "min_tokens": min(r["tokens"] for _, r in flat),
        "per_request_tokens_per_s_constrained": statistics.median(part(True)) if constrained else None,
        "per_request_tokens_per_s_free": statistics.median(part(False)) if constrained < clients else None,
    }


def load(args) -> dict:
    server, ready = server_for(OURS, args.gguf, args.clients, args)
    server.start(ready_path=ready)
    try:
        asyncio.run(round_(server.url, 2, 1, 1, 16))  # warm-up: first kernels, a grammar
        rounds = [
            asyncio.run(round_(server.url, args.clients, c, args.requests, args.max_tokens))
            for c in (0, args.constrained, 0)
        ]
    finally:
        server.stop()
    free = statistics.mean(r["tokens_per_s"] for r in rounds if not r["constrained_clients"])
    for r in rounds:
        print(
            f"{args.clients} clients, {r['constrained_clients']:2d} constrained: {r['tokens_per_s']:9.1f} tokens/s "
            f"(fewest tokens in a reply {r['min_tokens']})",
            flush=True,
        )
    ratio = rounds[1]["tokens_per_s"] / free
    print(f"mixed over unconstrained: {ratio:.3f}", flush=True)
    return {"rounds": rounds, "mixed_over_free": ratio}


def build(args) -> dict:
    from schema_coverage import load_cases, suite_dir

    from serve import structured
    from serve.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(args.gguf)  # the served vocabulary and grammar engine (serve/backends/guides.py)
    backend.compile_grammar(structured.schema_grammar({"type": "object"}))  # its tokenizer is read once, at first use
    cases, _ = load_cases(suite_dir(args.cache))
    check, init = [], []
    for case in cases:
        t0 = time.perf_counter()
        try:
            grammar = structured.schema_grammar(case["schema"])
        except structured.SchemaError:
            continue
        t1 = time.perf_counter()
        if backend.compile_grammar(grammar) is None:
            raise SystemExit(f"{case['id']}: the grammar engine refused the grammar")
        t2 = time.perf_counter()
        check.append(t1 - t0)
        init.append(t2 - t1)
    out = {"schemas": len(check)}
    for name, xs in (
        ("check_and_gbnf", check),
        ("engine_compile", init),
        ("total", [a + b for a, b in zip(check, init)]),
    ):
        xs = sorted(1000 * x for x in xs)
        out[name] = {"p50_ms": xs[len(xs) // 2], "p99_ms": xs[min(len(xs) - 1, int(0.99 * len(xs)))], "max_ms": xs[-1]}
        print(
            f"{name:20s} p50 {out[name]['p50_ms']:7.2f} ms  p99 {out[name]['p99_ms']:7.2f} ms  "
            f"max {out[name]['max_ms']:7.2f} ms",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("load", "build"))
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--constrained", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gpu-layers", type=int, default=-1)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aegis-schema-suite")
    ap.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "schema-load-logs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = {"mode": args.mode, "gguf": args.gguf.name, **vars(args)} | (
        load(args) if args.mode == "load" else build(args)
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
