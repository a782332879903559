"""The replica proof that .ci/containers.sh runs: N serve replicas behind the balancer of compose.replicas.yaml, driven
through the balancer's one port with the official openai SDK, and looked at from inside each replica.

    python tools/failover_check.py --api http://127.0.0.1:PORT --stats http://127.0.0.1:PORT --project NAME --key KEY

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

The container engine (podman, or docker) is only used to look inside the replicas and to kill one. What talks to the
engine, the balancer and the API is replica_probe.py, beside this script; the assertions, in their order, are here.
Exits 1 with the reason on the first failed assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error

import openai

# run as a script (python tools/failover_check.py), this folder is first on sys.path
from replica_probe import (
    HTTP,
    PROMPTS,
    Engine,
    Failed,
    Load,
    Outcome,
    backend_retries,
    balancer_log,
    balancer_servers,
    check,
    log,
    run_concurrently,
    stream_once,
    wait_up,
)

# ---- the proof -----------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--api", required=True, help="the balancer's API base URL (no /v1)")
    ap.add_argument("--stats", required=True, help="the balancer's status base URL (port 8404 inside)")
    ap.add_argument("--project", required=True, help="the compose project name")
    ap.add_argument("--key", required=True, help="the API key the replicas were started with")
    ap.add_argument("--engine", default="podman", help="container command (default podman)")
    ap.add_argument("--service", default="replica")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument(
        "--max-tokens", type=int, default=1000, help="tokens per kill-test request, at most the served context less 96"
    )
    ap.add_argument("--timeout", type=float, default=60, help="seconds a request may take before it counts as hung")
    args = ap.parse_args()
    check(args.replicas >= 2, "--replicas: at least 2 (one is killed)")
    return args


class Proof:
    """The assertions in their order (the module's docstring): each step a method, what later steps need kept here."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.engine = Engine(args.engine, args.project, args.service)

    def run(self) -> int:
        self.up()
        self.one_server()
        self.spread()
        self.kill()
        self.restarted()
        self.judge()
        return 0

    def up(self) -> None:
        """1. the balancer sees every replica up, and each replica's own /ready says 200."""
        args, engine, t0 = self.args, self.engine, time.time()
        up = wait_up(args.stats, args.replicas, 300)
        self.names = names = engine.replicas()
        check(len(names) == args.replicas, f"expected {args.replicas} {args.service} containers, found {names}")
        by_ip = {engine.ip(n): n for n in names}
        slot = {s["addr"]: srv for srv, s in up.items()}
        self.container_of = {slot[ip]: c for ip, c in by_ip.items() if ip in slot}
        check(len(self.container_of) == args.replicas, f"balancer slots {up} do not match the containers {by_ip}")
        for c in names:
            status, _ = engine.fetch(c, "/ready")
            check(status == 200, f"{c}: /ready answered {status}")
        log(
            f"balancer: {len(up)} replicas up in {time.time() - t0:.0f} s: "
            + ", ".join(f"{srv} = {c}" for srv, c in sorted(self.container_of.items()))
        )

    def one_server(self) -> None:
        """2. one server, as far as the client can tell: the key, the model, the same greedy text."""
        args, timeout = self.args, self.args.timeout
        self.client = client = openai.OpenAI(
            base_url=args.api + "/v1", api_key=args.key, max_retries=0, timeout=timeout
        )
        try:  # no key at all: the SDK always sends one, so plain HTTP
            HTTP.open(args.api + "/v1/models", timeout=10)
            raise Failed("the API answered /v1/models without a key")
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
            check(e.code == 401 and "message" in body.get("error", {}), f"no key: {e.code} {body}")
        try:
            openai.OpenAI(
                base_url=args.api + "/v1", api_key="not-the-key", max_retries=0, timeout=timeout
            ).models.list()
            raise Failed("the API answered with a wrong key")
        except openai.AuthenticationError as e:
            check(isinstance(e.body, dict) and "message" in e.body, f"401 not in the API's error shape: {e.body}")
        cards = client.models.list().data
        check(bool(cards), "no models listed")
        self.model = model = cards[0].id
        # a request longer than the served context is a 400 by design: the kill test's requests stay inside it,
        # with room for the chat template and the prompt (a few dozen tokens)
        context = int((cards[0].model_extra or {}).get("context_length") or 0)
        check(context > 128, f"/v1/models gave no usable context_length for {model!r}: {context}")
        args.max_tokens = min(args.max_tokens, context - 96)
        texts = set()
        for _ in range(2 * args.replicas):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=24, temperature=0, seed=0
            )
            reply = raw.parse()
            check(reply.model == model, f"reply names model {reply.model!r}, asked {model!r}")
            texts.add((raw.headers.get("x-aegis-replica"), reply.choices[0].message.content))
        answered_by = {r for r, _ in texts}
        check(len(answered_by) >= 2, f"sequential requests all went to {answered_by}")
        check(len({t for _, t in texts}) == 1, f"replicas answered one greedy request differently: {texts}")
        log(
            f"key enforced (401 without it and with a wrong one), model {model!r}; one greedy request answered by "
            f"{sorted(answered_by)} with the same text"
        )

    def spread(self) -> None:
        """3. load spreads: each replica's own /metrics counts its share, as the balancer's headers do."""
        args, engine, names = self.args, self.engine, self.names
        before = {c: engine.served(c) for c in names}
        n_req = 2 * args.clients
        live: list = []
        results = run_concurrently(
            args.clients,
            lambda i: [stream_once(self.client, self.model, 32, PROMPTS[(i + k) % 4], live) for k in range(2)],
        )
        outcomes = [o for rs in results for o in rs]
        check(not any(o.error for o in outcomes), f"streams failed: {[o.error for o in outcomes if o.error]}")
        self.shares = shares = {c: engine.served(c) - before[c] for c in names}
        check(sum(shares.values()) == n_req, f"replicas counted {shares}, {n_req} were sent")
        for c, k in shares.items():
            # leastconn sends each request to the replica with fewer open ones: an even split at first, then the
            # faster replica takes more; an eighth each is far from "one replica took it all"
            check(k >= n_req / 8, f"{c} answered {k} of {n_req}: the load did not spread ({shares})")
        headers = {self.container_of.get(o.replica, o.replica): 0 for o in outcomes}
        for o in outcomes:
            headers[self.container_of.get(o.replica, o.replica)] += 1
        check(headers == shares, f"the balancer's X-Aegis-Replica counts {headers} differ from the replicas' {shares}")
        log(f"spread: {n_req} streams from {args.clients} clients; each replica's /metrics counted {shares}")

    def kill(self) -> None:
        """4. one replica's processes killed with SIGKILL while streams run on it, under load."""
        args = self.args
        self.victim = victim = self.names[0]
        self.victim_srv = next(s for s, c in self.container_of.items() if c == victim)
        self.load = Load(self.client, self.model, args.max_tokens, args.clients)
        self.pid = self.engine.pid(victim)  # read before, so that the kill follows the check below at once
        deadline = time.time() + 120
        while True:
            # kill once a stream on the victim has its first tokens out and most still to come: the client may read
            # behind the replica, and a stream the replica has finished sending would survive the kill
            self.running = [
                o
                for o in list(self.load.live)
                if o.replica == self.victim_srv and 1 <= o.tokens <= args.max_tokens // 10
            ]
            if self.running:
                break
            check(time.time() < deadline, "no stream ever ran on the replica to be killed")
            time.sleep(0.05)
        self.retries0 = backend_retries(args.stats)
        self.t_kill = time.time()
        os.kill(self.pid, signal.SIGKILL)
        log(f"killed {victim} ({self.victim_srv}, pid {self.pid}) with {len(self.running)} stream(s) running on it")

    def restarted(self) -> None:
        """5. restarted by its policy, checked in by the balancer, serving again; then the load stops."""
        args, engine, victim = self.args, self.engine, self.victim
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
            if t_restart is None and new_pid and new_pid != self.pid:
                t_restart = time.time()
            if t_restart is not None and status.startswith("UP"):
                # the new process counts from zero, and only the balancer sends it chat completions
                try:
                    served_after = engine.served(victim)
                except Failed:
                    served_after = 0
                if served_after >= 2:
                    t_rejoin, victim_srv_now = time.time(), slot
            check(
                time.time() < deadline, f"{victim} did not come back: balancer {st}, restarted: {t_restart is not None}"
            )
            time.sleep(0.5)
        check(self.load.stop(args.timeout + 10), "a client is still waiting: a request hung")
        restarts = engine.inspect(victim, "{{.RestartCount}}")
        self.retries1 = backend_retries(args.stats)
        t_kill = self.t_kill
        down = f"out of rotation after {t_down - t_kill:.1f} s" if t_down else "never out of rotation (back first)"
        log(
            f"{victim}: {down}, restarted after {t_restart - t_kill:.1f} s "
            f"(restart count {restarts}), back in rotation as {victim_srv_now} after {t_rejoin - t_kill:.1f} s, "
            f"{served_after} requests served since"
        )
        self.times = {
            "down_s": t_down and round(t_down - t_kill, 1),
            "restart_s": round(t_restart - t_kill, 1),
            "rejoin_s": round(t_rejoin - t_kill, 1),
        }

    def judge(self) -> None:
        """Every request of the kill test, from the client's side and from the balancer's log."""
        done, t_kill, victim_srv = self.load.done, self.t_kill, self.victim_srv
        after = [o for o in done if o.start > t_kill]
        before_kill = [o for o in done if o.start <= t_kill]
        failed_after = [o for o in after if o.error]
        check(
            not failed_after,
            f"{len(failed_after)} requests started after the kill failed: {[o.error for o in failed_after[:5]]}",
        )
        failures = [o for o in before_kill if o.error]
        for o in failures:
            check(o.kind == "stream", f"a non-streamed request failed: {o.error}")
            check(o.replica == victim_srv, f"a stream on {o.replica}, not the killed {victim_srv}, failed: {o.error}")
            check(o.end - t_kill < 10, f"a stream failed {o.end - t_kill:.1f} s after the kill, not at once: {o.error}")
            check("timeout" not in o.error.lower() and "timed out" not in o.error.lower(), f"a stream hung: {o.error}")
        check(
            len(failures) >= 1,
            "no stream was cut by the kill: the test did not test it "
            f"(running on {victim_srv} at the kill: {self.running}; "
            f"then {[o for o in done if o in self.running]})",
        )
        lines = self.balancer_agrees(failures)
        whole_at_kill = [o for o in before_kill if o.kind == "whole" and o.end > t_kill]
        # non-streamed requests that were running on the killed replica and were sent again to another (+N retries):
        # accepted well before the kill, they had reached a live replica, and only the kill could make them fail
        replayed = [
            o
            for o in whole_at_kill
            if o.rid in lines and lines[o.rid]["retries"].startswith("+") and lines[o.rid]["accepted_s"] < t_kill - 0.2
        ]
        kinds = sorted({o.error.split(":")[0] for o in failures})
        retries0, retries1 = self.retries0, self.retries1
        log(
            f"kill test: {len(done)} requests ({len(after)} started after the kill, all answered); "
            f"{len(failures)} failed, all streams running on {victim_srv} at the kill, each within "
            f"{max(o.end - t_kill for o in failures):.2f} s ({', '.join(kinds)}: "
            f"{failures[0].error.split(': ', 1)[-1][:160]!r}; the balancer logged each as SD, its replica's "
            f"connection broken mid-reply); {len(whole_at_kill)} non-streamed request(s) in flight at the kill, all "
            f"answered, {len(replayed)} of them sent again to another replica by the balancer; "
            f"the balancer retried {retries1[0] - retries0[0]} connection(s) and redispatched "
            f"{retries1[1] - retries0[1]} request(s) meanwhile"
        )
        log(
            json.dumps(
                {
                    "replicas": self.args.replicas,
                    "spread": self.shares,
                    "killed_streams": len(failures),
                    "requests_after_kill": len(after),
                    "replayed_whole": len(replayed),
                    **self.times,
                }
            )
        )

    def balancer_agrees(self, failures: list[Outcome]) -> dict[str, dict]:
        """The balancer's log of the same requests: each failed stream cut by its replica (SD), each success a 200."""
        lines = balancer_log(self.engine)
        for o in failures:
            line = lines.get(o.rid)
            check(line is not None, f"no balancer log line for the failed {o.rid}")
            check(
                line["term"].startswith("SD") and line["server"] == self.victim_srv,
                f"{o.rid} failed on the client, but the balancer logged {line}",
            )
        for o in self.load.done:
            if not o.error and o.rid in lines:
                check(
                    lines[o.rid]["status"] == "200",
                    f"{o.rid} succeeded on the client, the balancer logged {lines[o.rid]}",
                )
        return lines


def main() -> int:
    return Proof(parse_args()).run()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        print(f"replicas: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
