"""Creating an Ollama model with the `ollama` client against a local server (loopback only) that checks every request
the way Ollama's API documents it: blobs addressed by "sha256:<64 hex>", an upload's body must hash to its digest
(else 400), HEAD says 200/404, and /api/create needs a model name and files that refer to uploaded blobs, streaming
JSON status lines."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aegis import families as registry
from export import chat_formats, modelfile, ollama
from export.files import ExportError
from support import families

DIGEST = re.compile(r"^/api/blobs/(sha256:[0-9a-f]{64})$")


class FakeOllama(BaseHTTPRequestHandler):
    blobs: dict[str, int] = {}
    creates: list[dict] = []
    problems: list[str] = []
    fail_create: str | None = None

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code: int, body: bytes = b"", ctype: str = "application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        m = DIGEST.match(self.path)
        if not m:
            self.problems.append(f"HEAD {self.path}: not /api/blobs/sha256:<hex>")
            return self._reply(400)
        self._reply(200 if m.group(1) in self.blobs else 404)

    def do_POST(self):
        length = self.headers.get("Content-Length")
        if length is None:
            self.problems.append(f"POST {self.path} without Content-Length")
            return self._reply(411)
        body = self.rfile.read(int(length))
        m = DIGEST.match(self.path)
        if m:
            if "sha256:" + hashlib.sha256(body).hexdigest() != m.group(1):
                self.problems.append("blob body does not match its digest")
                return self._reply(400, b'{"error":"digest mismatch"}')
            self.blobs[m.group(1)] = len(body)
            return self._reply(201)
        if self.path != "/api/create":
            return self._reply(404)
        try:
            req = json.loads(body)
        except ValueError:
            self.problems.append("create body is not JSON")
            return self._reply(400, b'{"error":"bad json"}')
        errors = []
        if not isinstance(req.get("model"), str) or not req["model"]:
            errors.append("model is required")
        files = req.get("files", {})
        if not files and "from" not in req:
            errors.append("files or from is required")
        for name, digest in files.items():
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest) or digest not in self.blobs:
                errors.append(f"file {name}: blob {digest} was not uploaded")
        params = req.get("parameters", {})
        if not isinstance(params.get("stop", []), list) or not all(isinstance(s, str) for s in params.get("stop", [])):
            errors.append("parameters.stop must be a list of strings")
        if "num_ctx" in params and not isinstance(params["num_ctx"], int):
            errors.append("parameters.num_ctx must be an integer")
        if "template" in req and not isinstance(req["template"], str):
            errors.append("template must be a string")
        if errors:
            self.problems.extend(errors)
            return self._reply(400, json.dumps({"error": "; ".join(errors)}).encode())
        self.creates.append(req)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        lines = [{"status": "parsing GGUF"}]
        for digest in files.values():
            lines.append({"status": f"using existing layer {digest}"})
        lines += (
            [{"error": self.fail_create}]
            if self.fail_create
            else [{"status": "writing manifest"}, {"status": "success"}]
        )
        for line in lines:
            self.wfile.write((json.dumps(line) + "\n").encode())
            self.wfile.flush()


@pytest.fixture
def server():
    FakeOllama.blobs, FakeOllama.creates, FakeOllama.problems, FakeOllama.fail_create = {}, [], [], None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def small_gguf(tiny_path, tmp_path_factory) -> Path:
    from export.to_gguf import write_gguf

    path = tmp_path_factory.mktemp("ollama") / "tiny-q8_0.gguf"
    write_gguf(tiny_path, path, "q8_0", progress=False, log=lambda *_: None)
    return path


@pytest.fixture(scope="module")
def mf(small_gguf, tiny_path) -> modelfile.Modelfile:
    return modelfile.build(small_gguf, tiny_path, system="日本語で答えてください。", log=lambda *_: None)


def test_create_uploads_the_gguf_then_creates_from_it(server, mf, small_gguf):
    logs = []
    ollama.create(mf, "aegis-tiny:q8", host=server, log=logs.append)
    assert FakeOllama.problems == []
    digest = "sha256:" + hashlib.sha256(small_gguf.read_bytes()).hexdigest()
    assert FakeOllama.blobs == {digest: small_gguf.stat().st_size}
    (req,) = FakeOllama.creates
    assert req["model"] == "aegis-tiny:q8" and req["files"] == {small_gguf.name: digest}
    # the template and stops the proof derived from the model's chat template, exactly as the Modelfile has them
    assert req["template"] == mf.proof.template and req["system"] == "日本語で答えてください。"
    assert req["parameters"]["stop"] == mf.proof.stops and "<|end|>" in req["parameters"]["stop"]
    assert req["parameters"]["num_ctx"] == 512 and req["stream"] is True
    assert "ollama: success" in logs and any("uploading" in line for line in logs)


def test_server_error_is_reported(server, mf):
    FakeOllama.fail_create = "unsupported architecture"
    with pytest.raises(ExportError, match="unsupported architecture"):
        ollama.create(mf, "aegis-tiny", host=server, log=lambda *_: None)


def test_no_server_is_a_clear_error(mf, monkeypatch):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
    with pytest.raises(ExportError, match=r"no Ollama server answering \(OLLAMA_HOST\).*OLLAMA_HOST"):
        ollama.create(mf, "aegis-tiny", log=lambda *_: None)


def test_bad_names(mf):
    with pytest.raises(ExportError, match="--name"):
        ollama.create(mf, "bad name!")


def test_ollama_command(server, small_gguf, tiny_path):
    """`python -m export ollama` derives the template from the model and creates the model through the client."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "ollama",
            "--gguf",
            str(small_gguf),
            "--model",
            str(tiny_path),
            "--name",
            "aegis-cli",
            "--host",
            server,
        ],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    assert "chat template: Phi-3" in proc.stdout and "ollama: created aegis-cli" in proc.stdout
    assert [c["model"] for c in FakeOllama.creates] == ["aegis-cli"] and FakeOllama.problems == []


@pytest.mark.parametrize("name", list(registry.FAMILIES))
def test_each_familys_template_reaches_ollama(server, small_gguf, tiny_path, tmp_path, name):
    """Every registered family: the template its file offers for its own chat template (with its tool section) and
    its stops go into Ollama's create request as derived, and its end-of-turn token stops a reply."""
    from transformers import AutoTokenizer

    family = registry.FAMILIES[name]
    fmt = next(k for k, spec in families.CHAT_FORMATS.items() if spec[5] == family.chat_template)
    tok = AutoTokenizer.from_pretrained(families.build_tokenizer(fmt, tmp_path / name, tiny_path))
    proof = chat_formats.derive(tok, name)
    ollama.create(
        modelfile.Modelfile(small_gguf, proof.template, proof.stops, 1024, proof=proof),
        f"aegis-{name}",
        host=server,
        log=lambda *_: None,
    )
    (req,) = FakeOllama.creates
    assert FakeOllama.problems == [] and proof.format == family.ollama_format
    assert req["template"] == proof.template and "$.Tools" in req["template"] and ".ToolCalls" in req["template"]
    assert req["parameters"]["stop"] == proof.stops and tok.eos_token in proof.stops
    assert set(family.end_of_turn[:1]) <= set(proof.stops)
