"""Aggregate tokens/s and time to first token through the balancer of compose.replicas.yaml with 1 and with 2 serve
replicas (one llama.cpp thread each by default), 8 concurrent streaming clients.

    python bench/replicas.py [--chain compose.cpu.yaml] [--project NAME] [--replicas 1,2] [--clients 8] [--requests 4]
                             [--max-tokens 128] [--threads 1] [--parallel 0] [--rounds 3]
                             [--out bench/replicas_results.json]

It drives the compose files themselves: for each replica count it runs
`up -d --no-deps --no-build --scale replica=N replica balancer` on the chain's files plus compose.replicas.yaml, waits
until the balancer reports exactly N replicas up, sends one warm-up request per replica, then times `--clients`
clients that each send `--requests` streamed greedy requests one after another through the balancer's one port.
Every request generates exactly --max-tokens tokens (`ignore_eos`), counted from the stream's usage chunk. Rounds
alternate between the replica counts and the median round (by tokens/s) is reported, so drift on a shared machine
falls on both. At the end the replicas and the balancer are removed (--keep leaves them).

Needs: the chain's export on its volume in project --project (e.g. `docker compose -f compose.cpu.yaml up export`),
the serve and balancer images built (`docker compose -f compose.cpu.yaml -f compose.replicas.yaml build balancer`),
and docker compose or docker-compose on PATH (with Podman: DOCKER_HOST pointing at its API socket, as
.ci/containers.sh sets up). The replicas get the chain's CPU serve image and volume (AEGIS_REPLICA_IMAGE and
AEGIS_DATA_VOLUME, when set, win). AEGIS_API_KEY, if set, is given to the replicas and sent by the clients.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import PROMPTS, chat_request, run_clients, summary  # noqa: E402

# each chain's file, its CPU serve image and its data volume (compose.replicas.yaml's header)
CHAINS = {
    "compose.cpu.yaml": ("aegis-serve:cpu", "aegis-cpu-data"),
    "compose.yaml": ("aegis-serve:latest", "aegis-data"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_command(given: str | None) -> list[str]:
    if given:
        return given.split()
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SystemExit("neither `docker compose` nor docker-compose is installed (--compose names another)")


class Stack:
    """The replicas and the balancer of one compose project, scaled on demand."""

    def __init__(self, compose: list[str], chain: str, project: str, threads: int, parallel: int):
        image, volume = CHAINS[chain]
        self.cmd = [*compose, "-p", project, "-f", str(REPO / chain), "-f", str(REPO / "compose.replicas.yaml")]
        self.api_port, self.stats_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "AEGIS_REPLICA_IMAGE": os.environ.get("AEGIS_REPLICA_IMAGE", image),
            "AEGIS_DATA_VOLUME": os.environ.get("AEGIS_DATA_VOLUME", volume),
            "AEGIS_REPLICA_THREADS": str(threads),
            "AEGIS_REPLICA_PARALLEL": str(parallel),
            "AEGIS_BIND": "127.0.0.1",
            "AEGIS_API_PORT": str(self.api_port),
            "AEGIS_BALANCER_PORT": str(self.stats_port),
        }
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.stats = f"http://127.0.0.1:{self.stats_port}"

    def compose(self, *args: str) -> None:
        p = subprocess.run([*self.cmd, *args], env=self.env, capture_output=True, text=True, cwd=REPO)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(self.cmd[-4:])} {' '.join(args)} failed:\n{p.stdout}{p.stderr}")

    def up_servers(self) -> dict[str, str]:
        """The balancer's replica slots that are in rotation (name -> status)."""
        with httpx.Client(trust_env=False, timeout=5) as c:
            text = c.get(self.stats + "/stats;csv;norefresh").text.lstrip("# ")
        return {
            r["svname"]: r["status"]
            for r in csv.DictReader(io.StringIO(text))
            if r["pxname"] == "replicas" and r["svname"] not in ("BACKEND", "FRONTEND") and r["status"].startswith("UP")
        }

    def scale(self, n: int, deadline_s: float = 600) -> float:
        """`up --scale replica=n`, then wait until exactly n replicas are up; returns the seconds that took."""
        start = time.time()
        self.compose("up", "-d", "--no-deps", "--no-build", "--scale", f"replica={n}", "replica", "balancer")
        while True:
            try:
                up = self.up_servers()
                if len(up) == n and all(s == "UP" for s in up.values()):
                    return time.time() - start
            except httpx.HTTPError:
                up = {}
            if time.time() - start > deadline_s:
                raise SystemExit(f"the balancer had {up} up, not {n} replicas, after {deadline_s:.0f} s")
            time.sleep(0.5)

    def remove(self) -> None:
        self.compose("rm", "-s", "-f", "replica", "balancer")


def body(model: str, prompt: str, max_tokens: int) -> dict:
    return chat_request(model, prompt, max_tokens, ignore_eos=True)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url, json=body(model, prompt, max_tokens)) as r:
        r.raise_for_status()
        replica = r.headers.get("x-aegis-replica", "?")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "total": end - start, "tokens": tokens, "replica": replica}


async def load(api: str, headers: dict, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    url = api + "/v1/chat/completions"

    async def request(client: httpx.AsyncClient, i: int, k: int) -> dict:
        return await one_request(client, url, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens)

    per_client, wall, cpu = await run_clients(request, clients, requests, 600, headers=headers, trust_env=False)
    results = [r for rs in per_client for r in rs]
    split: dict[str, int] = {}
    for r in results:
        split[r["replica"]] = split.get(r["replica"], 0) + 1
    return summary(results, wall) | {
        "requests_by_replica": dict(sorted(split.items())),
        "client_cpu_s": cpu,
        "short_replies": sum(r["tokens"] != max_tokens for r in results),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| replicas | clients | tokens/s (all clients) | vs 1 replica | tokens/s per request | TTFT p50 (ms) | "
        "TTFT p90 (ms) | requests per replica |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    one = next((r["tokens_per_s"] for r in rows if r["replicas"] == 1), None)
    for r in rows:
        ratio = f"{r['tokens_per_s'] / one:.2f}×" if one else ""
        lines.append(
            f"| {r['replicas']} | {r['clients']} | {r['tokens_per_s']:.1f} | {ratio} | "
            f"{r['per_request_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | "
            f"{' / '.join(str(v) for v in r['requests_by_replica'].values())} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--chain",
        choices=sorted(CHAINS),
        default="compose.cpu.yaml",
        help="the chain's compose file, whose volume and CPU serve image the replicas use",
    )
    ap.add_argument(
        "--project",
        default=os.environ.get("COMPOSE_PROJECT_NAME") or REPO.name,
        help="compose project that holds the chain's volume (default: $COMPOSE_PROJECT_NAME, else the "
        "repository folder's name, as compose picks it)",
    )
    ap.add_argument("--compose", help="compose command (default: docker compose, else docker-compose)")
    ap.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per replica")
    ap.add_argument(
        "--parallel", type=int, default=0, help="requests each replica decodes at once (0: serve's default)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per replica count (median reported)")
    ap.add_argument("--keep", action="store_true", help="leave the replicas and the balancer running")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "replicas_results.json")
    args = ap.parse_args(argv)
    try:
        counts = [int(c) for c in args.replicas.split(",")]
    except ValueError:
        ap.error(f"--replicas {args.replicas!r}: expected numbers like 1,2")
    if any(c < 1 for c in counts) or min(args.clients, args.requests, args.rounds, args.max_tokens) < 1:
        ap.error("--replicas, --clients, --requests, --rounds and --max-tokens must be positive")
    if args.threads < 0 or args.parallel < 0:
        ap.error("--threads and --parallel must be 0 (serve's default) or more")

    stack = Stack(compose_command(args.compose), args.chain, args.project, args.threads, args.parallel)
    key = os.environ.get("AEGIS_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    results: dict[int, list[dict]] = {n: [] for n in counts}
    started = datetime.now(UTC)
    try:
        for rnd in range(args.rounds):
            for n in counts:
                took = stack.scale(n)
                with httpx.Client(trust_env=False, timeout=60, headers=headers) as c:
                    r = c.get(stack.api + "/v1/models")
                    r.raise_for_status()
                    model = r.json()["data"][0]["id"]
                    for i in range(n):  # warm-up: leastconn with idle replicas takes each in turn
                        body_ = {**body(model, PROMPTS[i % len(PROMPTS)], 8), "stream": False}
                        body_.pop("stream_options")
                        c.post(stack.api + "/v1/chat/completions", json=body_).raise_for_status()
                load0 = os.getloadavg()[0]
                res = asyncio.run(load(stack.api, headers, model, args.clients, args.requests, args.max_tokens))
                res.update(round=rnd, scale_s=took, load_before=load0, load_after=os.getloadavg()[0], model=model)
                results[n].append(res)
                print(
                    f"round {rnd + 1}/{args.rounds}, {n} replica(s): {res['tokens_per_s']:.1f} tokens/s, TTFT p50 "
                    f"{res['ttft_p50_ms']:.0f} ms, split {res['requests_by_replica']}, load {load0:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if not args.keep:
            stack.remove()

    rows = []
    for n in counts:
        rs = results[n]
        best = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]
        rows.append(
            {
                "replicas": n,
                "clients": args.clients,
                **best,
                "rounds_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs],
            }
        )
    table = markdown(rows)
    result = {
        "date": started.isoformat(timespec="seconds"),
        "chain": args.chain,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "rounds": args.rounds,
        "threads_per_replica": args.threads,
        "parallel_per_replica": args.parallel or "serve's default",
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform()},
        "command": " ".join([f"python bench/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])]),
        "rows": rows,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
