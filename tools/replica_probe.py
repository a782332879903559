"""What the replica proof (failover_check.py) talks to: the container engine (to look inside the replicas and to
kill one), the balancer (its CSV stats and its request log) and the API through the balancer's one port (streamed and
whole chat completions with the official openai SDK, each recorded as an Outcome). Failed and check stop the proof
with a reason."""

from __future__ import annotations

import calendar
import csv
import io
import re
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass

import openai

HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never through a proxy
PROMPTS = [
    "こんにちは。自己紹介をしてください。",
    "日本の四季について説明してください。",
    "おすすめの本を三冊教えてください。",
    "明日の予定を立てるのを手伝ってください。",
]


class Failed(Exception):
    pass


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Failed(msg)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the containers ------------------------------------------------------------------------------------------------


class Engine:
    def __init__(self, cmd: str, project: str, service: str):
        self.cmd, self.project, self.service = cmd, project, service

    def run(self, *args: str, timeout: float = 60) -> str:
        p = subprocess.run([self.cmd, *args], capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise Failed(f"{self.cmd} {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def replicas(self, service: str | None = None) -> list[str]:
        out = self.run(
            "ps",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service or self.service}",
            "--format",
            "{{.Names}}",
        )
        return sorted(n for n in out.split() if n)

    def inspect(self, name: str, fmt: str) -> str:
        return self.run("inspect", "--format", fmt, name).strip()

    def ip(self, name: str) -> str:
        return self.inspect(name, "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}").split()[0]

    def pid(self, name: str) -> int:
        return int(self.inspect(name, "{{.State.Pid}}") or 0)

    def fetch(self, name: str, path: str) -> tuple[int, str]:
        """GET http://127.0.0.1:8000{path} from inside the replica (its own view, not the balancer's)."""
        code = (
            "import sys, urllib.request\n"
            "try:\n"
            f"    r = urllib.request.urlopen('http://127.0.0.1:8000{path}', timeout=10)\n"
            "    print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code)\n"
        )
        out = self.run("exec", name, "python", "-c", code, timeout=30)
        status, _, body = out.partition("\n")
        return int(status), body

    def served(self, name: str) -> int:
        """Chat completions this replica's process answered with 200 (its own aegis_requests_total)."""
        status, body = self.fetch(name, "/metrics")
        check(status == 200, f"{name}: /metrics answered {status}")
        m = re.search(r'^aegis_requests_total\{endpoint="/v1/chat/completions",status="200"\} (\S+)$', body, re.M)
        return int(float(m.group(1))) if m else 0


# ---- the balancer --------------------------------------------------------------------------------------------------


def balancer_servers(stats: str) -> dict[str, dict]:
    """The backend's server slots that have an address: name -> {status, addr}, from HAProxy's CSV stats."""
    with HTTP.open(stats + "/stats;csv;norefresh", timeout=5) as r:
        text = r.read().decode().lstrip("# ")
    out = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row["pxname"] == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND") and row.get("addr"):
            out[row["svname"]] = {"status": row["status"], "addr": row["addr"].rsplit(":", 1)[0]}
    return out


def backend_retries(stats: str) -> tuple[int, int]:
    """The backend's retries and redispatches so far (HAProxy's wretr and wredis)."""
    with HTTP.open(stats + "/stats;csv;norefresh", timeout=5) as r:
        text = r.read().decode().lstrip("# ")
    for row in csv.DictReader(io.StringIO(text)):
        if row["pxname"] == "replicas" and row["svname"] == "BACKEND":
            return int(row["wretr"] or 0), int(row["wredis"] or 0)
    raise Failed("no 'replicas' backend in the balancer's stats")


def wait_up(stats: str, want: int, deadline_s: float) -> dict[str, dict]:
    deadline = time.time() + deadline_s
    while True:
        try:
            servers = balancer_servers(stats)
        except OSError as e:
            servers = {"error": {"status": str(e), "addr": ""}}
        up = {n: s for n, s in servers.items() if s["status"] == "UP"}
        if len(up) >= want:
            return up
        if time.time() > deadline:
            raise Failed(f"the balancer saw {len(up)} of {want} replicas up after {deadline_s:.0f} s: {servers}")
        time.sleep(1)


# ---- requests ------------------------------------------------------------------------------------------------------

IDS = iter(range(1, 1 << 30))


@dataclass
class Outcome:
    kind: str  # "stream" or "whole"
    start: float
    rid: str = ""  # sent as ?ci=RID, so that the balancer's log line of each request can be found
    end: float = 0.0
    replica: str = ""  # X-Aegis-Replica: the balancer's server that answered
    tokens: int = 0
    first_token: float = 0.0
    finished: bool = False
    error: str = ""


def describe(e: BaseException) -> str:
    """The error and what caused it (the SDK wraps transport errors in APIConnectionError)."""
    out = f"{type(e).__name__}: {e}"
    if e.__cause__ is not None:
        out += f" ({type(e.__cause__).__name__}: {e.__cause__})"
    return out


def stream_once(client: openai.OpenAI, model: str, max_tokens: int, prompt: str, live: list) -> Outcome:
    o = Outcome("stream", time.time(), f"stream-{next(IDS)}")
    live.append(o)
    try:
        with client.chat.completions.with_streaming_response.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
            extra_query={"ci": o.rid},
        ) as resp:
            o.replica = resp.headers.get("x-aegis-replica", "")
            for chunk in resp.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    o.tokens += 1
                    o.first_token = o.first_token or time.time()
                if chunk.choices and chunk.choices[0].finish_reason:
                    o.finished = True
    except Exception as e:  # noqa: BLE001 - every failure is recorded and judged below
        o.error = describe(e)
    finally:
        o.end = time.time()
        live.remove(o)
    if not o.error and not o.finished:
        o.error = "the stream ended without a finish_reason"
    return o


def whole_once(client: openai.OpenAI, model: str, max_tokens: int, prompt: str) -> Outcome:
    o = Outcome("whole", time.time(), f"whole-{next(IDS)}")
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
            extra_query={"ci": o.rid},
        )
        o.replica = raw.headers.get("x-aegis-replica", "")
        reply = raw.parse()
        o.tokens = reply.usage.completion_tokens
        o.finished = reply.choices[0].finish_reason == "length"
        if reply.model != model:
            o.error = f"reply names model {reply.model!r}, asked {model!r}"
    except Exception as e:  # noqa: BLE001
        o.error = describe(e)
    o.end = time.time()
    return o


LOG_LINE = re.compile(
    r"\[(?P<accepted>\d+/\w+/\d+:\d+:\d+:\d+\.\d+)\] api replicas/(?P<server>\S+) \S+ "
    r"(?P<status>-?\d+) \d+ \S+ \S+ (?P<term>\S{4}) "
    r'\d+/\d+/\d+/\d+/(?P<retries>\+?\d+) \S+ "\w+ /v1/chat/completions\?ci=(?P<rid>[\w-]+) '
)


def balancer_log(engine: Engine) -> dict[str, dict]:
    """Each tagged request's line in HAProxy's log (httplog): the replica that answered last, the status, the
    termination state (SD: the replica's connection broke during the reply) and the retries (+N: redispatched)."""
    names = engine.replicas("balancer")
    check(len(names) == 1, f"expected one balancer container, found {names}")
    p = subprocess.run([engine.cmd, "logs", names[0]], capture_output=True, text=True, timeout=60)
    out = {}
    for m in LOG_LINE.finditer(p.stdout + p.stderr):
        line = m.groupdict()
        # HAProxy logs the container's local time, which is UTC (the image sets no time zone)
        day, ms = line["accepted"].rsplit(".", 1)
        line["accepted_s"] = calendar.timegm(time.strptime(day, "%d/%b/%Y:%H:%M:%S")) + int(ms) / 1000
        out[line["rid"]] = line
    return out


class Load:
    """`clients` threads sending requests until `stop()`: two send whole (non-streamed) ones, the others stream.
    Every Outcome lands in `done`; the streams running now are in `live`."""

    def __init__(self, client: openai.OpenAI, model: str, max_tokens: int, clients: int):
        self.client, self.model, self.max_tokens = client, model, max_tokens
        self.done: list[Outcome] = []
        self.live: list = []
        self._stop, self._lock = threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _loop(self, i: int) -> None:
        k = 0
        while not self._stop.is_set():
            prompt = PROMPTS[(i + k) % 4]
            o = (
                whole_once(self.client, self.model, self.max_tokens, prompt)
                if i < 2
                else stream_once(self.client, self.model, self.max_tokens, prompt, self.live)
            )
            with self._lock:
                self.done.append(o)
            k += 1

    def stop(self, timeout: float) -> bool:
        """Stops the clients; False when one still waits after `timeout` seconds (a request hung)."""
        self._stop.set()
        for t in self.threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self.threads)


def run_concurrently(n: int, fn) -> list:
    results: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
