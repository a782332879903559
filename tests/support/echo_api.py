"""A small OpenAI-protocol server on loopback whose model repeats the last user message (streamed in pieces), for the
chat page's browser tests that need to know what a reply holds (markup in a reply must show as text, like markup in
a message). It is the page's counterpart, not a stand-in for the page: the page under test is the real UI process."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTEXT = 512


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
            models = [{"id": name, "object": "model", "created": 0, "owned_by": "echo", "context_length": CONTEXT}
                      for name in self.server.names]
            return self._json(200, {"object": "list", "data": models})
        self._json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        self.server.requests.append(body)
        text = next((m["content"] for m in reversed(body.get("messages", [])) if m["role"] == "user"), "")
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        step = max(1, len(text) // 4)
        for i in range(0, len(text), step):
            chunk = {"id": "echo", "object": "chat.completion.chunk", "created": 0, "model": body.get("model"),
                     "choices": [{"index": 0, "delta": {"content": text[i:i + step]}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.02)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


class EchoApi:
    """with EchoApi("echo") as api: api.api is the base URL; api.requests the request bodies received."""

    def __init__(self, *names: str):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.names = list(names) or ["echo"]
        self.httpd.requests = []
        self.api = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def requests(self) -> list[dict]:
        return self.httpd.requests

    def __enter__(self) -> "EchoApi":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
