"""Create an Ollama model from a Modelfile: with the `ollama` CLI when it is on PATH, else through an Ollama
server's REST API at OLLAMA_HOST (default http://127.0.0.1:11434):

    HEAD /api/blobs/sha256:<digest>     is the GGUF already there? (200 yes, 404 no)
    POST /api/blobs/sha256:<digest>     upload it (body = the file; 201 created, 400 if the digest is wrong)
    POST /api/create                    {"model", "files": {name: "sha256:<digest>"}, "template", "system",
                                         "parameters", "stream": true}; answers one JSON status line at a time
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from . import modelfile as modelfile_mod
from .files import ExportError, sha256_file

DEFAULT_HOST = "http://127.0.0.1:11434"
SUPPORTED = ("FROM", "TEMPLATE", "SYSTEM", "PARAMETER", "LICENSE")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*(:[A-Za-z0-9_][A-Za-z0-9._-]*)?$")


def host_url(host: str | None = None) -> str:
    """OLLAMA_HOST may be 'host', 'host:port' or a URL; 0.0.0.0 (a server's bind address) means this machine."""
    host = (host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST).strip()
    if "://" not in host:
        host = "http://" + host
    parts = urlsplit(host)
    hostname = parts.hostname or "127.0.0.1"
    if hostname in ("0.0.0.0", "::"):
        hostname = "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 11434)
    return f"{parts.scheme}://{hostname}:{port}"


def _value(v: str):
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1]
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    if re.fullmatch(r"-?\d*\.\d+(e-?\d+)?|-?\d+e-?\d+", v, re.IGNORECASE):
        return float(v)
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def request_from_modelfile(path: Path, name: str) -> tuple[dict, Path | None]:
    """The /api/create body (without files) and the local GGUF that FROM names (None if FROM names a model)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such Modelfile")
    body: dict = {"model": name}
    gguf = None
    params: dict = {}
    for cmd, arg in modelfile_mod.parse(path.read_text(encoding="utf-8"), str(path)):
        if cmd not in SUPPORTED:
            raise ExportError(f"{path}: {cmd} is not supported by the REST client (supported: {', '.join(SUPPORTED)})")
        if cmd == "FROM":
            local = (path.parent / arg).resolve() if not Path(arg).is_absolute() else Path(arg)
            if local.is_file():
                gguf = local
            elif arg.startswith((".", "/")) or arg.endswith(".gguf"):
                raise ExportError(f"{path}: FROM {arg}: no such file ({local})")
            else:
                body["from"] = arg
        elif cmd == "TEMPLATE":
            body["template"] = arg
        elif cmd == "SYSTEM":
            body["system"] = arg
        elif cmd == "LICENSE":
            body["license"] = arg
        elif cmd == "PARAMETER":
            key, _, val = arg.partition(" ")
            if not val:
                raise ExportError(f"{path}: PARAMETER {key} has no value")
            if key == "stop":
                params.setdefault("stop", []).append(_value(val))
            else:
                params[key] = _value(val)
    if gguf is None and "from" not in body:
        raise ExportError(f"{path}: no FROM line")
    if params:
        body["parameters"] = params
    return body, gguf


class Client:
    def __init__(self, url: str, timeout: float = 600):
        self.url = url
        parts = urlsplit(url)
        conn = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._new = lambda: conn(parts.hostname, parts.port, timeout=timeout)

    def _call(self, method: str, path: str, body=None, headers=None):
        conn = self._new()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            return conn, conn.getresponse()
        except OSError as e:
            conn.close()
            raise ExportError(f"no `ollama` CLI on PATH and no Ollama server answering at {self.url} ({e}); start "
                              f"`ollama serve`, or set OLLAMA_HOST to where one runs") from None

    def has_blob(self, digest: str) -> bool:
        conn, resp = self._call("HEAD", f"/api/blobs/{digest}")
        resp.read()
        conn.close()
        if resp.status not in (200, 404):
            raise ExportError(f"{self.url}: HEAD /api/blobs/{digest} answered {resp.status} {resp.reason}")
        return resp.status == 200

    def push_blob(self, path: Path, digest: str) -> None:
        size = path.stat().st_size
        with open(path, "rb") as f:
            conn, resp = self._call("POST", f"/api/blobs/{digest}", body=f,
                                    headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
        text = resp.read().decode("utf-8", "replace")
        conn.close()
        if resp.status not in (200, 201):
            raise ExportError(f"{self.url}: uploading {path} as {digest} failed: {resp.status} {resp.reason} {text}")

    def create(self, body: dict, log=print) -> None:
        data = json.dumps(body).encode()
        conn, resp = self._call("POST", "/api/create", body=data, headers={"Content-Type": "application/json"})
        try:
            if resp.status != 200:
                raise ExportError(f"{self.url}: /api/create answered {resp.status} {resp.reason}: "
                                  f"{resp.read().decode('utf-8', 'replace')}")
            last = None
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                msg = json.loads(line)
                if "error" in msg:
                    raise ExportError(f"Ollama could not create {body['model']}: {msg['error']}")
                last = msg.get("status")
                log(f"ollama: {last}")
            if last != "success":
                raise ExportError(f"Ollama's /api/create ended without success (last status {last!r})")
        finally:
            conn.close()


def create(modelfile: Path, name: str, host: str | None = None, use_cli: bool | None = None, log=print) -> str:
    """Create model `name` from `modelfile`; returns how ("cli" or the server URL)."""
    if not NAME.match(name):
        raise ExportError(f"--name {name!r}: an Ollama model name is letters, digits, '.', '_', '-' (with optional "
                          f"namespace/ and :tag)")
    modelfile = Path(modelfile)
    body, gguf = request_from_modelfile(modelfile, name)  # validates the file whichever way it is sent
    cli = shutil.which("ollama") if use_cli is not False else None
    if cli:
        log(f"running {cli} create {name} -f {modelfile}")
        proc = subprocess.run([cli, "create", name, "-f", str(modelfile.resolve())], cwd=modelfile.parent)
        if proc.returncode != 0:
            raise ExportError(f"`ollama create {name}` failed (exit {proc.returncode})")
        return "cli"
    url = host_url(host)
    client = Client(url)
    if gguf is not None:
        digest = "sha256:" + sha256_file(gguf)
        if client.has_blob(digest):
            log(f"ollama: {gguf.name} is already on the server ({digest[:19]}…)")
        else:
            log(f"ollama: uploading {gguf.name} ({gguf.stat().st_size / 2**20:.1f} MiB) to {url}")
            client.push_blob(gguf, digest)
        body["files"] = {gguf.name: digest}
    body["stream"] = True
    client.create(body, log=log)
    log(f"ollama: created {name} on {url}")
    return url
