"""Helpers shared by the serve tests and the benchmark (bench/serve_bench.py): a real short training run of the
embedded model exported to GGUF (cached by a fingerprint of the code that makes it), and servers started as real
processes on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from aegis import runs
from aegis.config import EMBEDDED
from aegis.tiny import ensure as ensure_tiny

REPO = Path(__file__).resolve().parents[2]
TRAIN_ARGS = [
    "--config",
    str(REPO / "configs" / "quickstart.toml"),
    "--set",
    "schedule.total_steps=20",
    "--set",
    "schedule.warmup_steps=5",
    "--set",
    "schedule.anneal_steps=10",
    "--set",
    "train.save_steps=10",
    "--no-progress",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_FINGERPRINT: list[str] = []


def _fingerprint() -> str:
    """Computed once per process, so one test session uses one run even if code is committed meanwhile."""
    if not _FINGERPRINT:
        _FINGERPRINT.append(_compute_fingerprint())
    return _FINGERPRINT[0]


def _compute_fingerprint() -> str:
    """What the exported run depends on: the committed training and export code, the recipe and the embedded model's
    corpus (git tree hashes, so edits in progress elsewhere in the working tree do not force a rebuild; without git,
    the files' contents)."""
    h = hashlib.sha256(" ".join(TRAIN_ARGS[2:]).encode())
    try:
        trees = subprocess.run(
            ["git", "rev-parse", "HEAD:aegis", "HEAD:train", "HEAD:export", "HEAD:configs/quickstart.toml"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        h.update(trees.encode())
    except (OSError, subprocess.CalledProcessError):
        for folder in ("aegis", "train", "export"):
            for path in sorted((REPO / folder).rglob("*")):
                if path.is_file() and path.suffix in (".py", ".txt", ".jsonl", ".toml", ".jinja"):
                    h.update(path.relative_to(REPO).as_posix().encode())
                    h.update(path.read_bytes())
        h.update((REPO / "configs" / "quickstart.toml").read_bytes())
    return h.hexdigest()[:16]


def find_gguf(run_dir: Path, kind: str = "f16") -> Path | None:
    """The run's exported GGUF of that type (export writes RUN/export/NAME-TYPE.gguf); temporary files skipped."""
    ggufs = [p for p in sorted(Path(run_dir).glob("export/**/*.gguf")) if not p.name.startswith(".")]
    hits = [p for p in ggufs if p.stem.endswith(f"-{kind}")] or ggufs
    return hits[0] if hits else None


def exported_run(cache_root: Path, log=print) -> Path:
    """A run directory with a 20-step training run of the embedded model and its export (GGUF under export/).
    Reused while the fingerprint matches; rebuilt (train, then `python -m export all`) otherwise."""
    run = Path(cache_root).resolve() / f"run-{_fingerprint()}"
    if (run / "final").is_dir() and find_gguf(run):
        return run
    if run.exists():
        shutil.rmtree(run)
    run.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    steps = [
        [sys.executable, "-m", "train", *TRAIN_ARGS, "--run-dir", str(run)],
        [sys.executable, "-m", "export", "all", "--run", str(run)],
    ]
    for cmd in steps:
        log(f"$ {' '.join(cmd[1:])}")
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd[1:3])} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
    if not find_gguf(run):
        raise RuntimeError(f"export left no GGUF under {run / 'export'}")
    for old in run.parent.glob("run-*"):  # runs made by older code are of no further use
        if old != run:
            shutil.rmtree(old, ignore_errors=True)
    return run


def run_for_tests(request) -> Path:
    """For pytest fixtures: an exported short run of the embedded model, cached in pytest's cache directory (or
    AEGIS_TEST_RUN, an existing run directory with its export, for quick iterations)."""
    if os.environ.get("AEGIS_TEST_RUN"):
        return Path(os.environ["AEGIS_TEST_RUN"])
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    root = Path(cache.mkdir("aegis-serve")) if cache is not None else Path(tempfile.gettempdir()) / "aegis-serve"
    return exported_run(root)


def served_files(request) -> tuple[Path, Path]:
    """(GGUF, tokenizer directory) of the exported test run."""
    run = run_for_tests(request)
    return find_gguf(run), run / "final"


def base_gguf(run_dir: Path) -> Path:
    """The run's base model (before LoRA and soul) as a GGUF, for base-vs-souled comparisons; made once per run
    with `python -m export gguf`."""
    out = Path(run_dir) / "export-base" / "base-f16.gguf"
    if out.exists():
        return out
    base = runs.read_config(run_dir).model.base
    if base == EMBEDDED:
        base = str(ensure_tiny())
    done = subprocess.run(
        [sys.executable, "-m", "export", "gguf", "--model", base, "--out", str(out), "--type", "f16"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"export gguf of the base failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return out


class Server:
    """`python -m serve ARGS` on a free loopback port; waits until /ready answers 200."""

    def __init__(
        self,
        *args: str,
        api_key: str | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 180.0,
        module: str = "serve",
        ready_path: str = "/ready",
        program: str | None = None,
    ):
        """program: an executable to run instead of `python -m module` (llama.cpp's llama-server)."""
        self.port = free_port()
        self.api_key = api_key
        head = [program] if program else [sys.executable, "-m", module]
        self.args = [*head, *args, "--host", "127.0.0.1", "--port", str(self.port)]
        if api_key:
            self.args += ["--api-key", api_key]
        self.log_path = Path(log_path) if log_path else None
        self.ready_timeout = ready_timeout
        self.ready_path = ready_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path and self.log_path.exists() else ""

    def start(self, ready_path: str | None = None) -> Server:
        """Start and wait until ready_path (default: the one given at construction) answers 200."""
        ready_path = ready_path or self.ready_path
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {self.ready_timeout}s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def tiny_server(request, tmp_path_factory, *args: str, name: str = "tiny"):
    """The test run's GGUF served as `name` (one llama.cpp thread; more options in args); it must still be alive
    when the tests are done with it. Its context is the embedded model's whole 2048, not serve's default (the
    original 512, where replies are what export checked: tests/test_served_parity.py), for the tool prompts (some
    830 tokens) and long generations these tests send."""
    gguf, _ = served_files(request)
    log = tmp_path_factory.mktemp("serve") / f"{name}.log"
    with Server("--model", f"{name}={gguf}", "--threads", "1", "--ctx-size", "2048", *args, log_path=log) as server:
        yield server
        assert server.alive(), f"the server died during the tests:\n{server.log()}"


def openai_client(server: Server):
    import openai

    return openai.OpenAI(base_url=server.api, api_key=server.api_key or "none", max_retries=0, timeout=120)


def metric(server, name: str, **labels) -> float:
    """The sum of a Prometheus metric's samples on /metrics whose labels include these."""
    text = httpx.get(server.url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if m and all(part in (m.group(1) or "") for part in want.split(",") if part):
            total += float(m.group(2))
    return total
