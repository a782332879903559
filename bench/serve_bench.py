"""Tokens/s and time to first token of the AEGIS API against llama-cpp-python's own OpenAI server, on the same GGUF,
the same machine, one after the other, with 1 and 8 concurrent streaming clients.

    python bench/serve_bench.py [--gguf FILE] [--clients 1,8] [--requests 8] [--max-tokens 128] [--threads 1]
                                [--rounds 3] [--out bench/serve_results.json]

Both servers get one model instance (ours: --workers 1) with the same thread count and context, and the same
requests: greedy decoding (identical tokens from both, checked), streamed, so time to first token is measured at the
client. Rounds alternate between the servers, and the median round is reported, so drift on a shared machine falls
on both. Without --gguf, the GGUF of a short training run of the embedded model is made (and cached) first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.serving import Server, exported_run, find_gguf  # noqa: E402

PROMPTS = ["こんにちは。自己紹介をしてください。", "日本の四季について説明してください。",
           "おすすめの本を三冊教えてください。", "明日の予定を立てるのを手伝ってください。"]
MODEL = "bench"


# llama-cpp-python's server applies repeat_penalty 1.1 unless told 1.0; ours has no such field (and refuses it)
EXTRA = {"llama_cpp.server": {"repeat_penalty": 1.0}}


def body(prompt: str, max_tokens: int, stream: bool, extra: dict) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, **extra}


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    """A streamed request; times to the first content chunk and to the end."""
    start = time.perf_counter()
    first = None
    text = []
    async with client.stream("POST", url, json=body(prompt, max_tokens, True, extra)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            piece = choices[0].get("delta", {}).get("content") if choices else None
            if piece:
                if first is None:
                    first = time.perf_counter()
                text.append(piece)
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "total": end - start, "text": "".join(text), "prompt": prompt}


async def load(base: str, clients: int, requests: int, max_tokens: int, tokens: dict[str, int],
               extra: dict) -> dict:
    """`clients` concurrent clients, each sending `requests` requests one after another."""
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(i: int) -> list[dict]:
            return [await one_request(client, url, PROMPTS[(i + k) % len(PROMPTS)], max_tokens, extra)
                    for k in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    total_tokens = sum(tokens[r["prompt"]] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {"wall_s": wall, "requests": len(results), "completion_tokens": total_tokens,
            "tokens_per_s": total_tokens / wall,
            "per_request_tokens_per_s": statistics.median(tokens[r["prompt"]] / r["total"] for r in results),
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p90_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            "texts": {r["prompt"]: r["text"] for r in results}}


def completion_tokens(base: str, max_tokens: int, extra: dict) -> dict[str, int]:
    """Per prompt, the completion length from a non-streamed request (greedy: the same as in the timed runs)."""
    out = {}
    for p in PROMPTS:
        r = httpx.post(base + "/v1/chat/completions", json=body(p, max_tokens, False, extra), timeout=600)
        r.raise_for_status()
        out[p] = r.json()["usage"]["completion_tokens"]
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| clients | server | tokens/s (all clients) | tokens/s per request | TTFT p50 (ms) | TTFT p90 (ms) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['server']} | {r['tokens_per_s']:.1f} | "
                     f"{r['per_request_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="GGUF to serve (default: a short run of the embedded model)")
    ap.add_argument("--clients", default="1,8", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=8, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads, both servers")
    ap.add_argument("--ctx", type=int, default=2048, help="context length, both servers")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per level (median reported)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "serve_results.json")
    args = ap.parse_args(argv)
    try:
        levels = [int(c) for c in args.clients.split(",")]
    except ValueError:
        ap.error(f"--clients {args.clients!r}: expected numbers like 1,8")
    if any(c < 1 for c in levels) or args.requests < 1 or args.rounds < 1 or args.max_tokens < 1:
        ap.error("--clients, --requests, --rounds and --max-tokens must be positive")
    gguf = args.gguf
    if gguf is None:
        gguf = find_gguf(exported_run(Path(os.environ.get("AEGIS_CACHE", Path.home() / ".cache" / "aegis"))
                                      / "serve-bench", log=lambda m: print(m, file=sys.stderr)))
    if not gguf or not gguf.is_file():
        ap.error(f"--gguf {gguf}: no such file")

    common = ["--model", str(gguf)]
    ours = Server("--model", f"{MODEL}={gguf}", "--parallel", "1", "--threads", str(args.threads),
                  "--ctx-size", str(args.ctx), "--queue-size", "256")
    # --interrupt_requests False: by default llama_cpp.server aborts a running stream when the next request
    # arrives; queueing instead is what ours does and what 8 concurrent clients need
    theirs = Server(*common, "--model_alias", MODEL, "--n_threads", str(args.threads), "--n_threads_batch",
                    str(args.threads), "--n_ctx", str(args.ctx), "--interrupt_requests", "False",
                    module="llama_cpp.server")
    # llama_cpp.server takes --host/--port too, so Server's flags fit both; it has no /ready: poll /v1/models
    servers = {"aegis (serve)": (ours, "/ready"), "llama_cpp.server": (theirs, "/v1/models")}
    rows, raw = [], {}
    try:
        for name, (server, ready) in servers.items():
            server.start(ready_path=ready)
        tokens = {name: completion_tokens(s.url, args.max_tokens, EXTRA.get(name, {}))
                  for name, (s, _) in servers.items()}
        if len(set(json.dumps(t, sort_keys=True) for t in tokens.values())) != 1:
            print(f"warning: the servers produced different completion lengths: {tokens}", file=sys.stderr)
        for clients in levels:
            results = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name, (server, _) in servers.items():
                    results[name].append(asyncio.run(load(server.url, clients, args.requests, args.max_tokens,
                                                          tokens[name], EXTRA.get(name, {}))))
            texts = {name: rs[-1]["texts"] for name, rs in results.items()}
            same = len(set(json.dumps(t, sort_keys=True, ensure_ascii=False) for t in texts.values())) == 1
            for name, rs in results.items():
                best = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]  # the median round
                row = {"clients": clients, "server": name, "same_text_as_other": same,
                       **{k: v for k, v in best.items() if k != "texts"},
                       "rounds_tokens_per_s": [r["tokens_per_s"] for r in rs]}
                rows.append(row)
            raw[clients] = results
    finally:
        for server, _ in servers.values():
            server.stop()

    table = markdown(rows)
    overhead = {}
    for clients in levels:
        a = next(r for r in rows if r["clients"] == clients and r["server"] == "aegis (serve)")
        b = next(r for r in rows if r["clients"] == clients and r["server"] == "llama_cpp.server")
        overhead[clients] = {"throughput_pct": 100 * (b["tokens_per_s"] - a["tokens_per_s"]) / b["tokens_per_s"],
                             "ttft_p50_ms_delta": a["ttft_p50_ms"] - b["ttft_p50_ms"]}
    result = {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "max_tokens": args.max_tokens,
              "requests_per_client": args.requests, "rounds": args.rounds, "threads": args.threads,
              "ctx": args.ctx, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "python": platform.python_version()},
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows, "overhead": overhead, "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(table)
    for clients, o in overhead.items():
        print(f"{clients} client(s): overhead {o['throughput_pct']:+.1f} % in tokens/s against llama_cpp.server "
              f"(negative: ours is faster), TTFT p50 {o['ttft_p50_ms_delta']:+.1f} ms")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
