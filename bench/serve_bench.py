"""The serving engine against llama.cpp's own servers, side by side in one run on one machine and one GGUF:
ours (`python -m serve`, continuous batching), `llama-server` (continuous batching, `-np` slots; built from the
llama.cpp source that llama-cpp-python vendors) and `python -m llama_cpp.server` (one request at a time).

    python bench/serve_bench.py [--gguf FILE] [--clients 1,4,16,64] [--max-tokens 256] [--requests 2]
                                [--llama-server PATH] [--baseline-levels 1,4,16,64] [--ctx 1024] [--threads N]
                                [--gpu-layers -1] [--batched-bench PATH] [--prompt-tokens 32]
                                [--out bench/serve_results.json]

Each server is started for each level with as many slots as clients (ours --parallel N, llama-server -np N with a
context of N x --ctx, so every slot has --ctx tokens as ours does), all layers on the GPU when there is one. Every
client streams `--requests` greedy chat requests of --max-tokens new tokens (ours and llama-server take `ignore_eos`;
llama_cpp.server has no such option and gets the plain request its users send: a logit bias against end-of-turn
tokens would run its Python sampling path, ten times slower per token on a GPU, and flatter everyone else; its
replies may end early, which min_tokens shows). Tokens are counted from usage, else --max-tokens for a reply that
ended by length, else its chunks. Reported per level and server:
aggregate tokens/s, the median request's tokens/s, time to first token p50/p90, and peak memory (GPU memory in use
above what it was before the server started; without a GPU, the server process's peak RSS).

With --batched-bench, llama.cpp's own `llama-batched-bench` runs the same GGUF at the same levels (--prompt-tokens
prompt tokens and --max-tokens generated per sequence, no HTTP, no sampling work beyond its own): the library's limit,
as an aggregate (prompt and generation) and as generation alone.

Then prefix reuse: --chats five-turn chats (scripted replies, so both runs see the same prompts) on ours with
--prefix-cache on and off; time to first token of each turn (a one-token request), median over the chats.
Without --gguf, the GGUF of a short training run of the embedded model is made (and cached) first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aegis import digest  # noqa: E402
from bench.common import PROMPTS, run_clients, summary  # noqa: E402
from tests.support.serving import Server, exported_run, find_gguf, metric  # noqa: E402

TURNS = [
    "京都の有名なお寺をいくつか教えてください。それぞれの歴史についても簡単に説明してください。",
    "その中で、秋に紅葉が一番きれいなのはどこですか。行き方も教えてください。",
    "近くでおすすめの食事処はありますか。予算は一人三千円くらいです。",
    "雨の日でも楽しめる場所はありますか。子ども連れでも大丈夫なところがいいです。",
    "最後に、一日で回れるおすすめのコースを作ってください。",
]
REPLIES = [  # assistant turns of a usual length (~150 tokens each with the embedded tokenizer: turn 5 reads ~700)
    "有名なお寺としては、清水寺、金閣寺、銀閣寺、東福寺、南禅寺などがあります。清水寺は七七八年に開かれたと伝えられ、"
    "崖の上に張り出した舞台から京都の街を見渡せることで知られています。金閣寺は正式には鹿苑寺といい、足利義満の山荘を"
    "のちに寺としたもので、金箔に覆われた舎利殿が池に映る姿が見事です。銀閣寺は慈照寺といい、足利義政が東山に建てた"
    "山荘が始まりで、落ち着いた庭と建物が特徴です。南禅寺は大きな三門と、境内を通る水路閣で有名です。",
    "紅葉なら東福寺がいちばんのおすすめです。通天橋という屋根のある橋から谷を見下ろすと、一面が赤や黄色に染まって"
    "見えます。見ごろは例年十一月の中旬から下旬ですが、年によって少し前後します。行き方は、京都駅からJR奈良線に乗って"
    "一駅の東福寺駅で降り、そこから歩いて十分ほどです。京阪電車の東福寺駅も使えます。紅葉の季節はとても混むので、"
    "朝の拝観開始の時間に合わせて着くようにすると、比較的ゆっくり見られます。",
    "東福寺の周りには、湯豆腐や精進料理を出すお店がいくつかあります。昼の時間なら、一人三千円ほどで湯豆腐のコースや"
    "季節の小鉢がついた定食を食べられるお店が多いです。少し歩いて伏見稲荷大社の方へ行くと、いなり寿司やきつねうどんの"
    "お店もあり、こちらはもっと手ごろです。紅葉の時期の週末はどこも行列になるので、予約ができるお店なら前もって"
    "予約しておくと安心です。子ども向けの取り分け用のお皿を出してくれるお店もあります。",
    "雨の日なら、京都水族館と京都鉄道博物館がおすすめです。どちらも京都駅から歩いて十五分ほどの梅小路公園の中にあり、"
    "ほとんどが屋内なので天気を気にせず楽しめます。水族館ではオオサンショウウオやイルカのショーが見られ、鉄道博物館"
    "では本物の蒸気機関車や新幹線が並んでいて、運転のシミュレーターもあります。ベビーカーのまま入れて、授乳室や"
    "おむつ替えの場所もあるので、小さなお子さん連れでも大丈夫です。",
    "一日のコースなら、朝いちばんに東福寺で紅葉を見て、十一時ごろに近くのお店で湯豆腐の昼食をとります。午後は電車で"
    "京都駅へ戻り、梅小路公園まで歩いて京都鉄道博物館を見学し、夕方に京都水族館へ回ると、雨が降っても困りません。"
    "時間に余裕があれば、夜は京都駅の近くで夕食をとって、ライトアップされた京都タワーを見てから帰るのもよいでしょう。"
    "移動は電車と徒歩だけで済むので、子ども連れでも疲れにくいコースです。",
]
MODEL = "bench"
CHAT_CTX = 2048  # the five-turn chat's context
OURS, LLAMA_SERVER, LCP_SERVER = "aegis serve", "llama-server", "llama_cpp.server"


class MemoryWatch:
    """Memory a server holds: GPU memory in use (nvidia-smi) above the level before it started, or the process's
    peak resident set without a GPU. Read after the warm-up and after the timed load, never during it: llama.cpp
    keeps its buffers from the first step to the last, so the reading after the load is its peak, and a query of
    the driver while the load runs would share the timed GPU with it."""

    def __init__(self):
        self.gpu = shutil.which("nvidia-smi") is not None
        self.base = self._gpu_used() if self.gpu else 0
        self.peak = 0

    @staticmethod
    def _gpu_used() -> int:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
        ).stdout
        return int(out.split()[0]) if out.strip() else 0

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) // 1024
        except OSError:
            pass
        return 0

    def read(self, pid: int) -> int:
        """The peak so far, with a reading now."""
        self.peak = max(self.peak, self._gpu_used() - self.base if self.gpu else self._rss(pid))
        return self.peak


def server_for(name: str, gguf: Path, clients: int, args, prefix_cache: str = "on", ctx: int = 0) -> tuple[Server, str]:
    """The server and its readiness path, configured for `clients` concurrent requests (ctx: per slot)."""
    ctx = ctx or args.ctx
    args.logs.mkdir(parents=True, exist_ok=True)
    log = args.logs / f"{name.replace(' ', '_')}-{clients}-{prefix_cache}.log"  # a server that dies says why here
    if name == OURS:
        return Server(
            "--model",
            f"{MODEL}={gguf}",
            "--parallel",
            str(clients),
            "--ctx-size",
            str(ctx),
            "--queue-size",
            "512",
            "--prefix-cache",
            prefix_cache,
            "--n-gpu-layers",
            str(args.gpu_layers),
            *(["--threads", str(args.threads)] if args.threads else []),
            "--log-level",
            "warning",
            # a GGUF from elsewhere (random_model.py, --gguf) has no export record to verify
            *([] if digest.sidecar(gguf).is_file() else ["--no-verify"]),
            log_path=log,
        ), "/ready"
    if name == LLAMA_SERVER:
        return Server(
            "-m",
            str(gguf),
            "-a",
            MODEL,
            "-np",
            str(clients),
            "-c",
            str(ctx * clients),
            "-cb",
            "-ngl",
            str(999 if args.gpu_layers < 0 else args.gpu_layers),
            *(["-t", str(args.threads)] if args.threads else []),
            program=str(args.llama_server),
            log_path=log,
        ), "/health"
    # llama_cpp.server decodes one request at a time; --interrupt_requests False makes the next request wait instead
    # of aborting the running stream
    return Server(
        "--model",
        str(gguf),
        "--model_alias",
        MODEL,
        "--n_ctx",
        str(ctx),
        "--n_gpu_layers",
        str(args.gpu_layers),
        "--interrupt_requests",
        "False",
        *(["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)] if args.threads else []),
        module="llama_cpp.server",
        log_path=log,
    ), "/v1/models"


def body(name: str, messages: list[dict], max_tokens: int) -> dict:
    out = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if name != LCP_SERVER:  # llama_cpp.server has no ignore_eos (see the module's docstring)
        out["ignore_eos"] = True
        out["stream_options"] = {"include_usage": True}
    return out


async def one_request(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    """A streamed request: time to the first content, to the end, and the tokens (see the module's docstring)."""
    start = time.perf_counter()
    first, chunks, usage, reason = None, 0, None, None
    # a connection per request, for every server alike: llama-server dropped a kept-alive one before answering
    async with client.stream("POST", url, json=payload, headers={"Connection": "close"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            choices = chunk.get("choices") or []
            piece = choices[0].get("delta", {}).get("content") if choices else None
            reason = (choices[0].get("finish_reason") if choices else None) or reason
            if piece:
                first = first or time.perf_counter()
                chunks += 1
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else payload["max_tokens"] if reason == "length" else chunks
    return {"ttft": (first or end) - start, "total": end - start, "tokens": tokens, "start": start, "end": end}


async def load(base: str, name: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `requests` requests one after another."""
    url = base + "/v1/chat/completions"

    async def request(client: httpx.AsyncClient, i: int, k: int) -> dict:
        messages = [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}]
        return await one_request(client, url, body(name, messages, max_tokens))

    per_client, wall, cpu = await run_clients(request, clients, requests, 1800)
    results = [r for rs in per_client for r in rs]
    return summary(results, wall) | {"min_tokens": min(r["tokens"] for r in results), **timeline(per_client, cpu)}


def timeline(per_client: list[list[dict]], cpu: float) -> dict:
    """Where a load's wall time went: each client's requests end to end (the slowest client sets the wall), the
    slowest request, the gaps between a client's requests, and the client process's own CPU share (near 1.0: the
    bench, not the server, sets the pace)."""
    t0 = min(r["start"] for rs in per_client for r in rs)
    spans = [rs[-1]["end"] - rs[0]["start"] for rs in per_client]
    gaps = [b["start"] - a["end"] for rs in per_client for a, b in zip(rs, rs[1:])]
    totals = sorted(r["total"] for rs in per_client for r in rs)
    wall = max(r["end"] for rs in per_client for r in rs) - t0
    return {
        "client_span_s": {"min": min(spans), "median": statistics.median(spans), "max": max(spans)},
        "request_s": {"min": totals[0], "median": statistics.median(totals), "max": totals[-1]},
        "max_gap_s": max(gaps, default=0.0),
        "client_cpu_share": cpu / wall if wall > 0 else 0.0,
    }


def chat_turns(base: str, chat: int) -> list[tuple[float, int, int]]:
    """One five-turn chat with scripted replies, so every run sees the same prompts whatever its model says (a
    random-weight model's greedy reply can differ with the cache on and off, and so would the next prompt). Each
    turn asks for one token: its latency is the time to the first token. (ms, prompt tokens, cached tokens) per turn.
    `chat` numbers the opening, so consecutive chats share no more than the template's first tokens."""
    messages, out = [], []
    with httpx.Client(timeout=600) as client:
        for i, (turn, reply) in enumerate(zip(TURNS, REPLIES)):
            messages.append({"role": "user", "content": f"{chat + 1}件目の相談です。{turn}" if i == 0 else turn})
            start = time.perf_counter()
            r = client.post(
                base + "/v1/chat/completions",
                json={"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0},
            )
            r.raise_for_status()
            usage = r.json()["usage"]
            out.append(
                (
                    1000 * (time.perf_counter() - start),
                    usage["prompt_tokens"],
                    (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
                )
            )
            messages.append({"role": "assistant", "content": reply})
    return out


def prefix_reuse(gguf: Path, args, failed: list[dict]) -> dict:
    """Time to first token per turn of --chats five-turn chats on one slot, prefix cache on and off: the median
    over the chats per turn, with the prompt's length and the tokens found in the cache."""
    out = {}
    for cache in ("on", "off"):
        server, _ = server_for(OURS, gguf, 1, args, prefix_cache=cache, ctx=CHAT_CTX)
        try:
            with server:
                asyncio.run(load(server.url, OURS, 1, 1, 8))  # warm-up
                chats = [chat_turns(server.url, k) for k in range(args.chats)]
        except (RuntimeError, httpx.HTTPError) as e:
            failed.append({"server": OURS, "prefix_cache": cache, "error": str(e)[-2000:]})
            continue
        out[cache] = [
            {
                "turn": t + 1,
                "ttft_ms": statistics.median(c[t][0] for c in chats),
                "prompt_tokens": chats[0][t][1],
                "cached_tokens": chats[0][t][2],
            }
            for t in range(len(TURNS))
        ]
        print(
            f"prefix cache {cache}: time to first token per turn (ms, median of {args.chats} chats) "
            + ", ".join(f"{r['ttft_ms']:.1f}" for r in out[cache])
            + "; prompt/cached tokens "
            + ", ".join(f"{r['prompt_tokens']}/{r['cached_tokens']}" for r in out[cache]),
            flush=True,
        )
    return out


def markdown(rows: list[dict], memory: str) -> str:
    lines = [
        f"| clients | server | tokens/s (all clients) | tokens/s per request | TTFT p50 (ms) | TTFT p90 (ms) | "
        f"peak {memory} (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['server']} | {r['tokens_per_s']:.1f} | "
            f"{r['per_request_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} | "
            f"{r['peak_mib']} |"
        )
    return "\n".join(lines)


def batched_bench(program: Path, gguf: Path, levels: list[int], args) -> list[dict]:
    """llama-batched-bench at every level: one JSON line per level (pp, tg, pl, speed_tg, speed, ...)."""
    ctx = max(levels) * (args.prompt_tokens + args.max_tokens) + 256
    cmd = [
        str(program),
        "-m",
        str(gguf),
        "-c",
        str(ctx),
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        str(args.prompt_tokens),
        "-ntg",
        str(args.max_tokens),
        "-npl",
        ",".join(map(str, levels)),
        "-ngl",
        str(999 if args.gpu_layers < 0 else args.gpu_layers),
        "--output-format",
        "jsonl",
        *(["-t", str(args.threads)] if args.threads else []),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    args.logs.mkdir(parents=True, exist_ok=True)
    (args.logs / "llama-batched-bench.log").write_text(done.stdout + done.stderr)
    rows = [
        json.loads(line)
        for line in done.stdout.splitlines() + done.stderr.splitlines()
        if line.startswith("{") and '"speed_tg"' in line
    ]
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"llama-batched-bench exited with {done.returncode}: {done.stderr[-2000:]}")
    for r in rows:
        print(
            f"{r['pl']:3d} sequences llama-batched-bench {r['speed']:9.1f} tokens/s (generation alone "
            f"{r['speed_tg']:.1f})",
            flush=True,
        )
    return rows


def profiler(pid: int, out: Path) -> subprocess.Popen | None:
    """py-spy sampling the server's threads (not pausing it) into `out`, collapsed stacks, until interrupted; None
    (and a line saying so) where py-spy is not installed."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("--profile: py-spy is not installed; no profile", flush=True)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "record", "-p", str(pid), "-f", "raw", "-o", str(out), "-r", "200", "--threads", "--nonblocking"]
    spy = subprocess.Popen(cmd + ["-d", "3600"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(0.5)  # attached before the load starts
    return spy


def engine_counters(server: Server) -> dict[str, float]:
    """Ours' batched-engine counters from /metrics (summed over the models served): decode steps, the sequences
    they carried, and the engine thread's seconds (step, decode, decode_cpu)."""
    out = {name: metric(server, f"{name}_total") for name in ("aegis_decode_steps", "aegis_decode_sequences")}
    parts = ("step", "decode", "decode_cpu")
    return out | {f"aegis_engine_seconds:{p}": metric(server, "aegis_engine_seconds_total", part=p) for p in parts}


def engine_use(before: dict, after: dict, wall: float) -> dict:
    """What ours' decode thread did during a load: steps per second, the mean batch, and per step the ms spent in
    the step, in llama_decode (with its batch and logits) and the thread's CPU time there; busy: the share of the
    load's wall time spent in steps (near 1.0: the engine thread sets the pace)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps = d.get("aegis_decode_steps", 0.0)
    if not steps:
        return {}
    return {
        "steps": int(steps),
        "steps_per_s": steps / wall,
        "mean_batch": d.get("aegis_decode_sequences", 0.0) / steps,
        "step_ms": 1000 * d.get("aegis_engine_seconds:step", 0.0) / steps,
        "decode_ms": 1000 * d.get("aegis_engine_seconds:decode", 0.0) / steps,
        "decode_cpu_ms": 1000 * d.get("aegis_engine_seconds:decode_cpu", 0.0) / steps,
        "busy": d.get("aegis_engine_seconds:step", 0.0) / wall,
    }


def run_level(name: str, gguf: Path, clients: int, args) -> dict:
    server, ready = server_for(name, gguf, clients, args)
    watch = MemoryWatch()
    server.start(ready_path=ready)
    try:
        asyncio.run(load(server.url, name, 1, 1, 8))  # warm-up: first CUDA kernels, caches
        watch.read(server.proc.pid)
        before = engine_counters(server) if name == OURS else {}
        spy = profiler(server.proc.pid, args.profile / f"ours-{clients}.txt") if name == OURS and args.profile else None
        try:
            result = asyncio.run(load(server.url, name, clients, args.requests, args.max_tokens))
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled when interrupted
                spy.wait(timeout=60)
        if name == OURS:
            result["engine"] = engine_use(before, engine_counters(server), result["wall_s"])
        result_peak = watch.read(server.proc.pid)
    finally:
        server.stop()
    print(
        f"{clients:3d} clients  {name:18s} {result['tokens_per_s']:9.1f} tokens/s  "
        f"TTFT p50 {result['ttft_p50_ms']:8.1f} ms  peak {result_peak} MiB",
        flush=True,
    )
    return {"clients": clients, "server": name, **result, "peak_mib": result_peak}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="GGUF to serve (default: a short run of the embedded model)")
    ap.add_argument("--clients", default="1,4,16,64", help="comma-separated concurrency levels (empty: none)")
    ap.add_argument(
        "--baseline-levels",
        default="1,4,16,64",
        help="levels llama_cpp.server runs (it serves one request at a time, so high levels take long)",
    )
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot, every server")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: each server's default)")
    ap.add_argument("--gpu-layers", type=int, default=-1, help="-1: all")
    ap.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server executable (row left out without)")
    ap.add_argument(
        "--batched-bench", type=Path, help="llama.cpp's llama-batched-bench executable (row left out without)"
    )
    ap.add_argument(
        "--prompt-tokens",
        type=int,
        default=32,
        help="llama-batched-bench's prompt per sequence (the chat prompts the servers read are about this long)",
    )
    ap.add_argument("--chats", type=int, default=5, help="five-turn chats for the prefix-reuse measure (0: none)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "serve_results.json")
    ap.add_argument("--profile", type=Path, help="py-spy profiles of ours during each timed load go here")
    ap.add_argument(
        "--logs",
        type=Path,
        default=Path(tempfile.gettempdir()) / "serve-bench-logs",
        help="where each server's output goes",
    )
    args = ap.parse_args(argv)
    try:
        levels = [int(c) for c in args.clients.split(",") if c]
        baseline_levels = {int(c) for c in args.baseline_levels.split(",") if c}
    except ValueError:
        ap.error(f"--clients {args.clients!r} / --baseline-levels {args.baseline_levels!r}: expected numbers like 1,4")
    if any(c < 1 for c in levels) or args.requests < 1 or args.max_tokens < 1 or args.ctx < args.max_tokens + 64:
        ap.error("--clients, --requests and --max-tokens must be positive, --ctx at least --max-tokens + 64")
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        ap.error(f"--llama-server {args.llama_server}: not an executable")
    gguf = args.gguf
    if gguf is None:
        gguf = find_gguf(
            exported_run(
                Path(os.environ.get("AEGIS_CACHE", Path.home() / ".cache" / "aegis")) / "serve-bench",
                log=lambda m: print(m, file=sys.stderr),
            )
        )
    if not gguf or not gguf.is_file():
        ap.error(f"--gguf {gguf}: no such file")
    servers = [OURS] + ([LLAMA_SERVER] if args.llama_server else []) + [LCP_SERVER]

    rows, failed = [], []
    library = []  # the library's limit first: it takes seconds, and a run cut short still has it in its log
    if args.batched_bench:
        try:
            library = batched_bench(args.batched_bench, gguf, levels, args)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            print(f"llama-batched-bench: FAILED {e}", flush=True)
            failed.append({"server": "llama-batched-bench", "error": str(e)[-2000:]})
    for clients in levels:
        for name in servers:
            if name == LCP_SERVER and clients not in baseline_levels:
                continue
            try:
                rows.append(run_level(name, gguf, clients, args))
            except RuntimeError as e:  # one server failing still leaves the others' rows; the reason is kept
                print(f"{clients:3d} clients  {name}: FAILED {e}", flush=True)
                failed.append({"clients": clients, "server": name, "error": str(e)[-2000:]})
    turns = prefix_reuse(gguf, args, failed) if args.chats else {}

    memory = "GPU memory" if MemoryWatch().gpu else "RSS"
    table = markdown(rows, memory)
    ratios = {}
    for clients in levels:
        by = {r["server"]: r for r in rows if r["clients"] == clients}
        if OURS not in by:
            continue
        ratios[clients] = {
            other: by[OURS]["tokens_per_s"] / by[other]["tokens_per_s"]
            for other in (LLAMA_SERVER, LCP_SERVER)
            if other in by
        }
        for r in library:
            if r["pl"] == clients:
                ratios[clients]["llama-batched-bench"] = by[OURS]["tokens_per_s"] / r["speed"]
                ratios[clients]["llama-batched-bench generation"] = by[OURS]["tokens_per_s"] / r["speed_tg"]
    gpu = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
        if MemoryWatch().gpu
        else ""
    )
    result = {
        "gguf": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "ctx_per_slot": args.ctx,
        "threads": args.threads,
        "machine": {
            "cpus": os.cpu_count(),
            "gpu": gpu,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["bench/serve_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "rows": rows,
        "batched_bench": library,
        "failed": failed,
        "ratios_ours_over": ratios,
        "prefix_cache_ttft_ms": turns,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(table)
    for clients, r in ratios.items():
        print(f"{clients} client(s): ours / " + ", ".join(f"{k} = {v:.2f}x" for k, v in r.items()))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
