"""The server process under what a deployment throws at it: SIGTERM with requests in flight (drained within the
grace period, cut cleanly after it), slow and unfinished requests, idle connections by the hundred, uploads
abandoned half-way, and a GGUF that no longer matches what export wrote. Each against a real `python -m serve` on
loopback serving the GGUF of the test run, spoken to over raw sockets and httpx."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from support import serving
from support.serving import REPO, Server, metric

PROMPT = [{"role": "user", "content": "こんにちは。自己紹介をしてください。"}]


@pytest.fixture(scope="module")
def gguf(request) -> Path:
    return serving.served_files(request)[0]


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def _tiny(gguf: Path, log_path: Path, **options) -> Server:
    """`python -m serve` of the tiny GGUF on one thread, not started: each keyword is an option (shutdown_grace=60 is
    --shutdown-grace 60; True, a flag alone)."""
    args = ["--model", f"tiny={gguf}", "--threads", "1"]
    for name, value in options.items():
        args += ["--" + name.replace("_", "-")] + ([] if value is True else [str(value)])
    return Server(*args, log_path=log_path)


def _error_code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


# ---- shutdown ---------------------------------------------------------------------------------------------------


def _ask(server: Server, stream: bool, max_tokens: int, out: list, started: threading.Event | None = None) -> None:
    """One chat request; appends how it ended: ("stream", status, finish_reason, error_code, saw_done) or
    ("whole", status, finish_reason, error_code)."""
    body = {
        "model": "tiny",
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    try:
        if not stream:
            r = httpx.post(server.api + "/chat/completions", json=body, timeout=120)
            finish = r.json()["choices"][0]["finish_reason"] if r.status_code == 200 else None
            out.append(("whole", r.status_code, finish, _error_code(r)))
            return
        finish = code = None
        done = False
        with httpx.stream("POST", server.api + "/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    code = event["error"]["code"]
                elif event["choices"]:
                    finish = event["choices"][0]["finish_reason"] or finish
                    if started is not None and event["choices"][0]["delta"].get("content"):
                        started.set()
        out.append(("stream", r.status_code, finish, code, done))
    except Exception as e:  # noqa: BLE001 - a cut connection is an outcome to report, not a crash of the test
        out.append(("broken", repr(e)))


def _in_flight(server: Server, stream_tokens: int, whole_tokens: int, out: list) -> list[threading.Thread]:
    """4 streams generating (each has sent text) and 4 whole requests waiting behind them (--parallel 4)."""
    threads, started = [], [threading.Event() for _ in range(4)]
    for event in started:
        threads.append(threading.Thread(target=_ask, args=(server, True, stream_tokens, out, event)))
        threads[-1].start()
    for event in started:
        assert event.wait(60), f"a stream sent nothing: {out}\n{server.log()}"
    for _ in range(4):
        threads.append(threading.Thread(target=_ask, args=(server, False, whole_tokens, out)))
        threads[-1].start()
    _wait(lambda: metric(server, "aegis_queue_depth", model="tiny") == 4, 30, "4 requests queued")
    return threads


def _refuses_at_once(server: Server) -> None:
    """Right after SIGTERM: /ready and a new request answer the JSON 503 `shutting_down`."""
    ready = httpx.get(server.url + "/ready", timeout=5)
    assert ready.status_code == 503 and _error_code(ready) == "shutting_down", ready.text
    late = httpx.post(
        server.api + "/chat/completions", json={"model": "tiny", "messages": PROMPT, "max_tokens": 4}, timeout=5
    )
    assert late.status_code == 503, late.text
    assert late.json()["error"] == {
        "message": late.json()["error"]["message"],
        "type": "server_error",
        "param": None,
        "code": "shutting_down",
    }


def _sigterm_in_flight(
    server: Server, stream_tokens: int, whole_tokens: int, join_s: float
) -> tuple[list, float, float]:
    """SIGTERM while _in_flight's 8 requests run, checked to refuse new work at once: (each request's outcome once its
    thread ends or join_s passes, when the signal was sent, how long the refusals took)."""
    out: list = []
    threads = _in_flight(server, stream_tokens, whole_tokens, out)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    _refuses_at_once(server)
    refused = time.monotonic() - sent
    for t in threads:
        t.join(join_s)
    return out, sent, refused


def test_sigterm_lets_the_requests_in_flight_finish(gguf, tmp_path):
    """SIGTERM with 4 streams running and 4 requests queued: /ready and new requests get 503 at once, and every
    request in flight still gets its whole reply within the grace period; then the process exits 0."""
    server = _tiny(gguf, tmp_path / "serve.log", parallel=4, shutdown_grace=60).start()
    try:
        # the streams as long as the context allows: the whole requests must still find every slot taken
        out, _, refused = _sigterm_in_flight(server, 450, 100, join_s=90)
        assert refused < 2
        assert sorted(out) == [("stream", 200, "length", None, True)] * 4 + [("whole", 200, "length", None)] * 4, (
            f"{out}\n{server.log()}"
        )
        assert server.proc.wait(15) == 0, server.log()
    finally:
        server.stop()
    assert " ERROR " not in server.log(), server.log()


def test_what_runs_past_the_grace_period_ends_cleanly(gguf, tmp_path):
    """With a 1 s grace period, requests that need far longer end as API errors, not cut connections: each stream
    with an error event (shutting_down) and [DONE], each queued request with the JSON 503."""
    server = _tiny(gguf, tmp_path / "serve.log", parallel=4, ctx_size=2048, shutdown_grace=1).start()
    try:
        out, sent, _ = _sigterm_in_flight(server, 1900, 1900, join_s=30)
        assert sorted(out) == (
            [("stream", 200, None, "shutting_down", True)] * 4 + [("whole", 503, None, "shutting_down")] * 4
        ), f"{out}\n{server.log()}"
        assert server.proc.wait(15) == 0, server.log()
        assert time.monotonic() - sent < 1 + 8, "the grace period was not kept to"
    finally:
        server.stop()
    log = server.log()
    assert "grace period (1 s) is over: ending the 8 request(s)" in log, log
    assert " ERROR " not in log and "Internal Server Error" not in log, log


def test_a_second_signal_stops_at_once(gguf, tmp_path):
    server = _tiny(gguf, tmp_path / "serve.log", parallel=1, ctx_size=2048, shutdown_grace=60).start()
    try:
        out: list = []
        started = threading.Event()
        t = threading.Thread(target=_ask, args=(server, True, 1900, out, started))
        t.start()
        assert started.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        _wait(lambda: httpx.get(server.url + "/ready").status_code == 503, 5, "/ready 503")
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(10)
        assert time.monotonic() - sent < 5
        t.join(10)
    finally:
        server.stop()


def test_a_stopping_server_answers_503_for_the_shutdown_delay(gguf, tmp_path):
    """--shutdown-delay: with nothing in flight the server still answers /ready (503) that long after SIGTERM, so
    that a balancer's health checks see it leave before it stops listening; then it exits 0."""
    server = _tiny(gguf, tmp_path / "serve.log", shutdown_delay=1.5).start()
    try:
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        seen = []
        while server.proc.poll() is None:
            try:
                seen.append(httpx.get(server.url + "/ready", timeout=2).status_code)
            except httpx.TransportError:
                break
            time.sleep(0.1)
        assert server.proc.wait(10) == 0, server.log()
        assert 1.5 <= time.monotonic() - sent < 6 and len(seen) >= 3 and set(seen) == {503}, seen
    finally:
        server.stop()


def _seconds(text: str) -> float:
    assert text.endswith("s") and text[:-1].isdigit(), text
    return float(text[:-1])


def test_containers_give_the_drain_its_time():
    """Every compose file's serve service is given longer than serve's grace period to stop (Compose's default is
    10 s, after which it kills), and a replica keeps answering /ready 503 at least as long as the balancer's checks
    take to mark it down (its interval, then fall - 1 fast intervals)."""
    yaml = pytest.importorskip("yaml")
    from serve.config import Settings
    from serve.server import BACKSTOP, CUT_WAIT

    grace = Settings().shutdown_grace
    files = {"compose.yaml": "serve", "compose.cpu.yaml": "serve", "compose.replicas.yaml": "replica"}
    for name, service in files.items():
        svc = yaml.safe_load((REPO / name).read_text())["services"][service]
        assert grace + CUT_WAIT < _seconds(svc["stop_grace_period"]) <= grace + CUT_WAIT + BACKSTOP + 10, name
    command = yaml.safe_load((REPO / "compose.replicas.yaml").read_text())["services"]["replica"]["command"]
    delay = float(command[command.index("--shutdown-delay") + 1])
    cfg = (REPO / "docker" / "balancer" / "haproxy.cfg").read_text()
    check = dict(re.findall(r"\b(inter|fastinter|fall) (\d+)s?\b", cfg.split("default-server", 1)[1].split("\n")[0]))
    assert delay >= int(check["inter"]) + (int(check["fall"]) - 1) * int(check["fastinter"]), (delay, check)


# ---- connections ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(gguf, tmp_path_factory):
    """A server with short deadlines and a small bound on connections."""
    log = tmp_path_factory.mktemp("serve") / "guarded.log"
    with _tiny(gguf, log, parallel=1, header_timeout=1, body_timeout=1, max_connections=40) as s:
        yield s
        assert s.alive(), s.log()


def _connect(server: Server, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if data:
        s.sendall(data)
    return s


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout bounds the wait)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _post_head(length: int) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_slow_headers_are_closed_after_the_header_timeout(guarded):
    before = metric(guarded, "aegis_connections_dropped_total", reason="header_timeout")
    half = _connect(guarded, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    silent = _connect(guarded)
    start = time.monotonic()
    status, body = _status_and_json(_read_all(half))
    assert status == 408 and body["error"]["code"] == "request_timeout", body
    assert _read_all(silent) == b""  # nothing was asked, nothing is answered: only closed
    assert 0.9 < time.monotonic() - start < 4
    assert metric(guarded, "aegis_connections_dropped_total", reason="header_timeout") == before + 2


def test_a_stalled_body_gets_408_and_is_closed(guarded):
    s = _connect(guarded, _post_head(500) + b'{"messages": [')
    start = time.monotonic()
    raw = _read_all(s)
    status, body = _status_and_json(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout", raw
    assert b"connection: close" in raw.lower()
    assert 0.9 < time.monotonic() - start < 4
    assert metric(guarded, "aegis_requests_total", endpoint="/v1/chat/completions", status="408") >= 1


def _open_files(server: Server) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def test_idle_connections_are_bounded_and_then_closed(guarded):
    """200 connections that send nothing: past --max-connections each is answered 503 and closed at once (the
    process's open files stay bounded), and the rest are closed after the header timeout; then the server answers."""
    base = _open_files(guarded)
    idle = [_connect(guarded) for _ in range(200)]
    time.sleep(0.3)
    assert _open_files(guarded) <= base + 40 + 5
    status, body = _status_and_json(_read_all(idle[-1]))
    assert status == 503 and body["error"]["code"] == "too_many_connections", body
    for s in idle[:10]:  # the first ones, within the bound, are closed after --header-timeout
        assert _read_all(s) == b""
    for s in idle:
        s.close()
    _wait(lambda: httpx.get(guarded.url + "/health").status_code == 200, 5, "answering again")
    assert metric(guarded, "aegis_connections_dropped_total", reason="over_limit") >= 150


def test_abandoned_uploads_are_client_errors(guarded):
    """Clients that send headers and part of a body, then disconnect: counted as 499 in /metrics, logged as a
    client event, never a 5xx and never an ERROR line."""
    for _ in range(20):
        _connect(guarded, _post_head(1000) + b'{"messages": [{"role": "user", "content": "').close()
    _wait(
        lambda: metric(guarded, "aegis_requests_total", endpoint="/v1/chat/completions", status="499") == 20,
        10,
        "20 abandoned uploads counted as 499",
    )
    text = httpx.get(guarded.url + "/metrics").text
    assert not [
        line
        for line in text.splitlines()
        if line.startswith('aegis_requests_total{endpoint="/v1/') and 'status="5' in line
    ], text
    log = guarded.log()
    assert " ERROR " not in log and "went away before sending all of its POST /v1/chat/completions body" in log, log


# ---- verifying the GGUF -----------------------------------------------------------------------------------------


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve", *args, "--port", str(serving.free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_damaged_gguf_is_refused_unless_told_otherwise(gguf, tmp_path):
    copy = tmp_path / gguf.name
    shutil.copyfile(gguf, copy)
    shutil.copyfile(gguf.with_name(gguf.name + ".sha256"), copy.with_name(copy.name + ".sha256"))
    with open(copy, "r+b") as f:  # one byte of the last tensor's data
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x10]))
    proc = _serve("--model", str(copy))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert str(copy) in lines[0] and "does not match" in lines[0] and "--no-verify" in lines[0], lines

    copy.with_name(copy.name + ".sha256").unlink()
    proc = _serve("--model", str(copy))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "--no-verify" in lines[0], proc.stderr

    with _tiny(copy, tmp_path / "serve.log", no_verify=True) as s:
        r = httpx.post(s.api + "/chat/completions", json={"messages": PROMPT, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
