"""A small OpenAI-protocol server on loopback whose model repeats the last user message (streamed in pieces), for the
chat page's browser tests that need to know what a reply holds (markup in a reply must show as text, like markup in
a message) or when it is written (a stream as slow as the test asks, held before its end until the test lets it
finish, and a count of the streams the client closed before their end). It is the page's counterpart, not a
stand-in for the page: the page under test is the real UI process."""

from __future__ import annotations

import json
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTEXT = 512


class ClientGone(Exception):
    """The client closed the stream before its end."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/").endswith("/v1/models"):
            models = [
                {"id": name, "object": "model", "created": 0, "owned_by": "echo", "context_length": CONTEXT}
                for name in self.server.names
            ]
            return self._json(200, {"object": "list", "data": models})
        self._json(404, {"error": {"message": "not found"}})

    def _wait(self, seconds: float | None, until: threading.Event | None = None) -> None:
        """Sleep (or wait for `until`), watching the connection: a client that closes it ends the wait at once."""
        waited = 0.0
        while True:
            step = 0.05 if until is not None else max(0.0, (seconds or 0.0) - waited)
            readable, _, _ = select.select([self.connection], [], [], step)
            if readable:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        raise ClientGone
                except ConnectionError as e:
                    raise ClientGone from e
            waited += step
            if (until is not None and until.is_set()) or (until is None and waited >= (seconds or 0.0)):
                return

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        server = self.server
        server.requests.append(body)
        text = next((m["content"] for m in reversed(body.get("messages", [])) if m["role"] == "user"), "")
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        step = max(1, -(-len(text) // server.pieces))
        try:
            for i in range(0, len(text), step):
                chunk = {
                    "id": "echo",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": body.get("model"),
                    "choices": [{"index": 0, "delta": {"content": text[i : i + step]}, "finish_reason": None}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                self._wait(server.delay)
            if server.hold is not None:
                server.holding.set()
                self._wait(None, server.hold)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (ClientGone, ConnectionError):
            with server.lock:
                server.closed_early += 1
        self.close_connection = True


class EchoApi:
    """with EchoApi("echo") as api: api.api is the base URL; api.requests the request bodies received.

    A reply comes in `pieces` pieces, `delay` seconds apart. While `hold` is an Event, each stream waits after its
    last piece until it is set (`holding` is set once one waits). `closed_early` counts the streams the client
    closed before their end (what stop and clear on the page do)."""

    def __init__(self, *names: str):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.names = list(names) or ["echo"]
        self.httpd.requests = []
        self.httpd.lock = threading.Lock()
        self.httpd.closed_early = 0
        self.httpd.holding = threading.Event()
        self.slow(0.02, None)
        self.api = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def slow(self, delay: float, hold: threading.Event | None = None, pieces: int = 4) -> None:
        """Pace the replies from now on."""
        self.httpd.delay, self.httpd.hold, self.httpd.pieces = delay, hold, pieces
        self.httpd.holding.clear()

    @property
    def requests(self) -> list[dict]:
        return self.httpd.requests

    @property
    def closed_early(self) -> int:
        return self.httpd.closed_early

    @property
    def holding(self) -> threading.Event:
        return self.httpd.holding

    def __enter__(self) -> EchoApi:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self.httpd.hold is not None:
            self.httpd.hold.set()
        self.httpd.shutdown()
        self.httpd.server_close()
