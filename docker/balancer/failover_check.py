"""The replica proof that .ci/containers.sh runs: N serve replicas behind the balancer of compose.replicas.yaml, driven
through the balancer's one port with the official openai SDK, and looked at from inside each replica.

    python failover_check.py --api http://127.0.0.1:PORT --stats http://127.0.0.1:PORT --project NAME --key KEY

What it asserts, in order:
  1. the balancer sees every replica up (its /stats), and each replica's own /ready says 200;
  2. the key is enforced as by one server (no key and a wrong key: 401 in the API's shape), the model id of
     /v1/models is the one replies carry, and one greedy request answered by different replicas gives the same text:
     a client cannot tell the balancer from one server;
  3. load spreads: 8 concurrent streaming clients; each replica's own /metrics counts its share of the requests, the
     shares add up to what was sent (and match the balancer's X-Aegis-Replica headers), and each replica took at
     least an eighth;
  4. one replica's processes are killed (SIGKILL from the host, as a crash or the OOM killer would) while streams
     run on it, under load from 8 clients (6 streaming, 2 not): every request started after the kill succeeds; the
     only failures are streams that were running on the killed replica, each ending with a connection error within
     seconds (none timed out), and the balancer's own log shows each as broken by its replica mid-reply (SD);
     every non-streamed request in flight at the kill is answered (the log shows which ones the balancer sent
     again after the replica died under them: reported, not asserted, as it depends on where they were);
  5. the killed replica is started again by its restart policy, passes the balancer's checks and serves requests
     again (its own /metrics, which start from zero in the new process, count them).

The container engine (podman, or docker) is only used to look inside the replicas and to kill one. Exits 1 with the
reason on the first failed assertion.
"""

from __future__ import annotations

import argparse
import calendar
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import openai

HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never through a proxy
PROMPTS = ["こんにちは。自己紹介をしてください。", "日本の四季について説明してください。",
           "おすすめの本を三冊教えてください。", "明日の予定を立てるのを手伝ってください。"]


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
        out = self.run("ps", "--filter", f"label=com.docker.compose.project={self.project}",
                       "--filter", f"label=com.docker.compose.service={service or self.service}",
                       "--format", "{{.Names}}")
        return sorted(n for n in out.split() if n)

    def inspect(self, name: str, fmt: str) -> str:
        return self.run("inspect", "--format", fmt, name).strip()

    def ip(self, name: str) -> str:
        return self.inspect(name, "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}").split()[0]

    def pid(self, name: str) -> int:
        return int(self.inspect(name, "{{.State.Pid}}") or 0)

    def fetch(self, name: str, path: str) -> tuple[int, str]:
        """GET http://127.0.0.1:8000{path} from inside the replica (its own view, not the balancer's)."""
        code = ("import sys, urllib.request\n"
                "try:\n"
                f"    r = urllib.request.urlopen('http://127.0.0.1:8000{path}', timeout=10)\n"
                "    print(r.status); print(r.read().decode())\n"
                "except urllib.error.HTTPError as e:\n"
                "    print(e.code)\n")
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
    kind: str            # "stream" or "whole"
    start: float
    rid: str = ""        # sent as ?ci=RID, so that the balancer's log line of each request can be found
    end: float = 0.0
    replica: str = ""    # X-Aegis-Replica: the balancer's server that answered
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
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=0, stream=True, extra_body={"ignore_eos": True}, extra_query={"ci": o.rid}) as resp:
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
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            extra_body={"ignore_eos": True}, extra_query={"ci": o.rid})
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


LOG_LINE = re.compile(r'\[(?P<accepted>\d+/\w+/\d+:\d+:\d+:\d+\.\d+)\] api replicas/(?P<server>\S+) \S+ (?P<status>-?\d+) \d+ \S+ \S+ (?P<term>\S{4}) '
                      r'\d+/\d+/\d+/\d+/(?P<retries>\+?\d+) \S+ "\w+ /v1/chat/completions\?ci=(?P<rid>[\w-]+) ')


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


def run_concurrently(n: int, fn) -> list:
    results: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---- the proof -----------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--api", required=True, help="the balancer's API base URL (no /v1)")
    ap.add_argument("--stats", required=True, help="the balancer's status base URL (port 8404 inside)")
    ap.add_argument("--project", required=True, help="the compose project name")
    ap.add_argument("--key", required=True, help="the API key the replicas were started with")
    ap.add_argument("--engine", default="podman", help="container command (default podman)")
    ap.add_argument("--service", default="replica")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=1000, help="tokens per request in the kill test")
    ap.add_argument("--timeout", type=float, default=60, help="seconds a request may take before it counts as hung")
    args = ap.parse_args()
    check(args.replicas >= 2, "--replicas: at least 2 (one is killed)")
    engine = Engine(args.engine, args.project, args.service)
    t0 = time.time()

    # 1. up
    up = wait_up(args.stats, args.replicas, 300)
    names = engine.replicas()
    check(len(names) == args.replicas, f"expected {args.replicas} {args.service} containers, found {names}")
    by_ip = {engine.ip(n): n for n in names}
    slot = {s["addr"]: srv for srv, s in up.items()}
    container_of = {slot[ip]: c for ip, c in by_ip.items() if ip in slot}
    check(len(container_of) == args.replicas, f"balancer slots {up} do not match the containers {by_ip}")
    for c in names:
        status, _ = engine.fetch(c, "/ready")
        check(status == 200, f"{c}: /ready answered {status}")
    log(f"balancer: {len(up)} replicas up in {time.time() - t0:.0f} s: "
        + ", ".join(f"{srv} = {c}" for srv, c in sorted(container_of.items())))

    # 2. one server, as far as the client can tell
    timeout = args.timeout
    client = openai.OpenAI(base_url=args.api + "/v1", api_key=args.key, max_retries=0, timeout=timeout)
    try:  # no key at all: the SDK always sends one, so plain HTTP
        HTTP.open(args.api + "/v1/models", timeout=10)
        raise Failed("the API answered /v1/models without a key")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        check(e.code == 401 and "message" in body.get("error", {}), f"no key: {e.code} {body}")
    try:
        openai.OpenAI(base_url=args.api + "/v1", api_key="not-the-key", max_retries=0, timeout=timeout).models.list()
        raise Failed("the API answered with a wrong key")
    except openai.AuthenticationError as e:
        check(isinstance(e.body, dict) and "message" in e.body, f"401 not in the API's error shape: {e.body}")
    models = [m.id for m in client.models.list().data]
    check(bool(models), "no models listed")
    model = models[0]
    texts = set()
    for _ in range(2 * args.replicas):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=24, temperature=0, seed=0)
        reply = raw.parse()
        check(reply.model == model, f"reply names model {reply.model!r}, asked {model!r}")
        texts.add((raw.headers.get("x-aegis-replica"), reply.choices[0].message.content))
    answered_by = {r for r, _ in texts}
    check(len(answered_by) >= 2, f"sequential requests all went to {answered_by}")
    check(len({t for _, t in texts}) == 1, f"replicas answered one greedy request differently: {texts}")
    log(f"key enforced (401 without it and with a wrong one), model {model!r}; one greedy request answered by "
        f"{sorted(answered_by)} with the same text")

    # 3. load spreads
    before = {c: engine.served(c) for c in names}
    n_req = 2 * args.clients
    live: list = []
    results = run_concurrently(args.clients, lambda i: [stream_once(client, model, 32, PROMPTS[(i + k) % 4], live)
                                                        for k in range(2)])
    outcomes = [o for rs in results for o in rs]
    check(not any(o.error for o in outcomes), f"streams failed: {[o.error for o in outcomes if o.error]}")
    shares = {c: engine.served(c) - before[c] for c in names}
    check(sum(shares.values()) == n_req, f"replicas counted {shares}, {n_req} were sent")
    for c, k in shares.items():
        # leastconn sends each request to the replica with fewer open ones: an even split at first, then the
        # faster replica takes more; an eighth each is far from "one replica took it all"
        check(k >= n_req / 8, f"{c} answered {k} of {n_req}: the load did not spread ({shares})")
    headers = {container_of.get(o.replica, o.replica): 0 for o in outcomes}
    for o in outcomes:
        headers[container_of.get(o.replica, o.replica)] += 1
    check(headers == shares, f"the balancer's X-Aegis-Replica counts {headers} differ from the replicas' {shares}")
    log(f"spread: {n_req} streams from {args.clients} clients; each replica's /metrics counted {shares}")

    # 4. kill one replica mid-load
    victim = names[0]
    victim_srv = next(s for s, c in container_of.items() if c == victim)
    stop = threading.Event()
    done: list[Outcome] = []
    live = []
    lock = threading.Lock()

    def loop(i: int) -> None:
        k = 0
        while not stop.is_set():
            # two loops of whole (non-streamed) requests, the others stream
            prompt = PROMPTS[(i + k) % 4]
            o = (whole_once(client, model, args.max_tokens, prompt) if i < 2 else
                 stream_once(client, model, args.max_tokens, prompt, live))
            with lock:
                done.append(o)
            k += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    pid = engine.pid(victim)  # read before, so that the kill follows the check below at once
    deadline = time.time() + 120
    while True:
        # kill once a stream on the victim has its first tokens out and most still to come: the client may read
        # behind the replica, and a stream the replica has finished sending would survive the kill
        running = [o for o in list(live) if o.replica == victim_srv and 1 <= o.tokens <= args.max_tokens // 10]
        if running:
            break
        check(time.time() < deadline, "no stream ever ran on the replica to be killed")
        time.sleep(0.05)
    retries0 = backend_retries(args.stats)
    in_flight = len(running)
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    log(f"killed {victim} ({victim_srv}, pid {pid}) with {in_flight} stream(s) running on it")

    # 5. restarted by its policy, checked in by the balancer, serving again
    t_down = t_restart = t_rejoin = None
    served_after = 0
    deadline = time.time() + 240
    while t_rejoin is None:
        try:
            st = balancer_servers(args.stats)
        except OSError:
            st = {}
        try:
            new_pid, ip = engine.pid(victim), engine.ip(victim)
        except (Failed, IndexError):  # between runs: no process, maybe no address
            new_pid, ip = 0, ""
        slot = next((n for n, s in st.items() if s["addr"] == ip), None) if ip else None
        status = st.get(slot, {}).get("status", "gone") if slot else "gone"
        if t_down is None and not status.startswith("UP"):
            t_down = time.time()
        if t_restart is None and new_pid and new_pid != pid:
            t_restart = time.time()
        if t_restart is not None and status.startswith("UP"):
            # the new process counts from zero, and only the balancer sends it chat completions
            try:
                served_after = engine.served(victim)
            except Failed:
                served_after = 0
            if served_after >= 2:
                t_rejoin, victim_srv_now = time.time(), slot
        check(time.time() < deadline, f"{victim} did not come back: balancer {st}, restarted: {t_restart is not None}")
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(args.timeout + 10)
    check(not any(t.is_alive() for t in threads), "a client is still waiting: a request hung")
    restarts = engine.inspect(victim, "{{.RestartCount}}")
    retries1 = backend_retries(args.stats)
    down = f"out of rotation after {t_down - t_kill:.1f} s" if t_down else "never out of rotation (back first)"
    log(f"{victim}: {down}, restarted after {t_restart - t_kill:.1f} s "
        f"(restart count {restarts}), back in rotation as {victim_srv_now} after {t_rejoin - t_kill:.1f} s, "
        f"{served_after} requests served since")

    # judge every request of the kill test
    after = [o for o in done if o.start > t_kill]
    before_kill = [o for o in done if o.start <= t_kill]
    failed_after = [o for o in after if o.error]
    check(not failed_after, f"{len(failed_after)} requests started after the kill failed: "
                            f"{[o.error for o in failed_after[:5]]}")
    failures = [o for o in before_kill if o.error]
    for o in failures:
        check(o.kind == "stream", f"a non-streamed request failed: {o.error}")
        check(o.replica == victim_srv, f"a stream on {o.replica}, not the killed {victim_srv}, failed: {o.error}")
        check(o.end - t_kill < 10, f"a stream failed {o.end - t_kill:.1f} s after the kill, not at once: {o.error}")
        check("timeout" not in o.error.lower() and "timed out" not in o.error.lower(), f"a stream hung: {o.error}")
    check(len(failures) >= 1, "no stream was cut by the kill: the test did not test it "
                              f"(running on {victim_srv} at the kill: {running}; then {[o for o in done if o in running]})")
    # the balancer's side of the same requests
    lines = balancer_log(engine)
    for o in failures:
        line = lines.get(o.rid)
        check(line is not None, f"no balancer log line for the failed {o.rid}")
        check(line["term"].startswith("SD") and line["server"] == victim_srv,
              f"{o.rid} failed on the client, but the balancer logged {line}")
    for o in done:
        if not o.error and o.rid in lines:
            check(lines[o.rid]["status"] == "200", f"{o.rid} succeeded on the client, the balancer logged {lines[o.rid]}")
    whole_at_kill = [o for o in before_kill if o.kind == "whole" and o.end > t_kill]
    # non-streamed requests that were running on the killed replica and were sent again to another (+N retries):
    # accepted well before the kill, they had reached a live replica, and only the kill could make them fail there
    replayed = [o for o in whole_at_kill if o.rid in lines and lines[o.rid]["retries"].startswith("+")
                and lines[o.rid]["accepted_s"] < t_kill - 0.2]
    kinds = sorted({o.error.split(":")[0] for o in failures})
    log(f"kill test: {len(done)} requests ({len(after)} started after the kill, all answered); "
        f"{len(failures)} failed, all streams running on {victim_srv} at the kill, each within "
        f"{max(o.end - t_kill for o in failures):.2f} s ({', '.join(kinds)}: "
        f"{failures[0].error.split(': ', 1)[-1][:160]!r}; the balancer logged each as SD, its replica's connection "
        f"broken mid-reply); {len(whole_at_kill)} non-streamed request(s) in flight at the kill, all answered, "
        f"{len(replayed)} of them sent again to another replica by the balancer; the balancer retried {retries1[0] - retries0[0]} connection(s) and redispatched "
        f"{retries1[1] - retries0[1]} request(s) meanwhile")
    log(json.dumps({"replicas": args.replicas, "spread": shares, "killed_streams": len(failures),
                    "requests_after_kill": len(after), "replayed_whole": len(replayed), "down_s": t_down and round(t_down - t_kill, 1),
                    "restart_s": round(t_restart - t_kill, 1), "rejoin_s": round(t_rejoin - t_kill, 1)}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        print(f"replicas: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
