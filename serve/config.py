"""The server's settings, declared once in aegis/cli.py's pattern: each field's default, help text, check and
variable make the command line (`python -m serve --help`), and the app, the registry and the tests read the same
fields."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from aegis import cli
from aegis.cli import setting

from .backends import KINDS, detect
from .speculate import vocabulary_difference

PROG = "python -m serve"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    backend: str = "auto"  # auto | llamacpp | hf


def default_name(path: Path) -> str:
    """A model id from its path: the GGUF's stem, a model directory's name, or run-checkpoint for a training
    checkpoint (runs/x/final -> x-final)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return path.stem
    if (path / "soul.safetensors").exists():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return f"{run.name}-{path.name}" if run.name else path.name
    return path.name or "model"


def parse_model_arg(text: str) -> ModelSpec:
    """`PATH` or `NAME=PATH` (NAME is what clients put in "model")."""
    name, sep, path = text.partition("=")
    if not sep or "/" in name or not NAME_RE.match(name):
        # no NAME= prefix (a path may contain '=' too, but then it also has no valid name before it)
        name, path = "", text
    path = Path(path).expanduser()
    return ModelSpec(name or default_name(path), path)


POSITIVE_INT = cli.bounded(int, 0, strict=True)
NON_NEGATIVE = cli.bounded(int, 0)
POSITIVE = cli.bounded(float, 0, strict=True)
SECONDS = cli.bounded(float, 0)


@dataclass
class Settings:
    """Serve an OpenAI-compatible API over llama.cpp (GGUF files) or transformers (merged model directories,
    training checkpoints). A GGUF must match the NAME.gguf.sha256 that export wrote beside it (--no-verify for a
    file made elsewhere). /health answers at once, the API once the models are loaded (503 before). SIGTERM or
    Ctrl-C drains the server: /ready and new requests answer 503 while the requests in flight get --shutdown-grace
    seconds to finish."""

    models: list[ModelSpec] = setting(
        None,
        "a GGUF file, a merged model directory or a training checkpoint; "
        "repeat to serve several (the first is the default); NAME is the id "
        "clients use (default: from the path)",
        flag="--model",
        parse=parse_model_arg,
        metavar="[NAME=]PATH",
        repeat=True,
        env="AEGIS_MODEL",
        required=True,
    )
    backend: str = setting("auto", "auto: llama.cpp for GGUF files, transformers for directories", choices=KINDS)
    host: str = setting("127.0.0.1", "address to listen on (default: loopback only)")
    port: int = setting(8000, "TCP port", parse=cli.tcp_port, metavar="N", env="AEGIS_PORT")
    api_key: str | None = setting(
        None, "require 'Authorization: Bearer KEY' on /v1 (default: no key)", metavar="KEY", env="AEGIS_API_KEY"
    )
    parallel: int = setting(
        0,
        "requests each model serves at once (0: 4 for llama.cpp, decoded together in one batch "
        "with a KV cache per request; 1 for transformers, which runs a worker thread each)",
        parse=NON_NEGATIVE,
    )
    batch_size: int = setting(
        512,
        "llama.cpp: most tokens one decode step takes (a token per generating request, "
        "then chunks of the prompts being read)",
        parse=POSITIVE_INT,
    )
    prefix_cache: str = setting(
        "on",
        "llama.cpp: a request whose prompt starts as a finished one's did (a chat's next turn) reuses that KV cache",
        choices=("on", "off"),
    )
    cache_type: str = setting(
        "f16",
        "llama.cpp: the KV cache's type; q8_0 takes about half the memory of f16 (more "
        "slots or context in the same memory) for replies that may differ slightly",
        choices=("f16", "q8_0"),
    )
    speculate: int = setting(
        0,
        "llama.cpp: the most tokens drafted per step for a greedy request (temperature 0, no grammar) "
        "from its own prompt and reply (prompt lookup: what followed the last repeat of its "
        "latest tokens), checked in the same decode; the reply is the same, sooner where it "
        "repeats its input (0: off)",
        parse=NON_NEGATIVE,
        metavar="N",
    )
    draft_model: Path | None = setting(
        None,
        "llama.cpp: a smaller GGUF with the model's vocabulary that drafts the "
        "--speculate N tokens instead of prompt lookup (greedy, N decodes of the "
        "draft per step, all requests together); the reply is the same",
        metavar="PATH",
    )
    queue_size: int = setting(
        64, "requests that may wait for a worker before the server answers 429", parse=NON_NEGATIVE
    )
    timeout: float = setting(300.0, "seconds per request, queue included", parse=POSITIVE)
    max_body: int = setting(1 << 20, "largest request body (413 beyond)", parse=POSITIVE_INT, metavar="BYTES")
    ctx_size: int = setting(
        0,
        "context length (0: the model's own, at most 4096; a LongRoPE GGUF's original one, "
        "where replies are what export checked)",
        parse=NON_NEGATIVE,
    )
    max_tokens_default: int = setting(
        0, "max_tokens for chat requests that give none (0: the rest of the context)", parse=NON_NEGATIVE
    )
    threads: int = setting(0, "llama.cpp threads (0: half the cores)", parse=NON_NEGATIVE)
    n_gpu_layers: int = setting(
        -1, "llama.cpp layers on the GPU, as llama.cpp's own -ngl (-1: all, where the build has a GPU; 0: CPU only)"
    )
    device: str = setting("auto", "transformers backend: auto | cpu | cuda | cuda:N")
    dtype: str = setting(
        "auto", "transformers backend compute dtype", choices=("auto", "bfloat16", "float16", "float32")
    )
    quantization: str | None = setting(
        None,
        "transformers backend, training checkpoints: load the base in 4-bit or not (default: as trained)",
        choices=("nf4", "none"),
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    no_verify: bool = setting(
        False,
        "serve GGUF files without checking them against the NAME.gguf.sha256 that export "
        "writes beside each (for files made elsewhere)",
    )
    shutdown_grace: float = setting(
        30.0,
        "seconds the requests in flight get to finish after SIGTERM or Ctrl-C "
        "(meanwhile /ready and new requests answer 503); what still runs then ends "
        "with an error (a stream: an error event and [DONE]); a second signal "
        "stops at once",
        parse=SECONDS,
    )
    shutdown_delay: float = setting(
        0.0,
        "seconds a stopping server keeps answering (/ready and new requests 503) "
        "even with no request in flight, so that a balancer's health checks see it "
        "leave before it stops listening",
        parse=SECONDS,
    )
    header_timeout: float = setting(
        10.0,
        "seconds a client has to send a request's headers, from connecting or from "
        "its first byte on a kept-alive connection (then it is closed)",
        parse=POSITIVE,
    )
    body_timeout: float = setting(
        30.0, "seconds a request's body may take to arrive in full (408 beyond)", parse=POSITIVE
    )
    max_connections: int = setting(
        1000,
        "open connections at once; one more is answered 503 and closed, so that "
        "idle clients never use up the process's files",
        parse=POSITIVE_INT,
    )

    def problems(self) -> list[str]:
        """Each model exists and is of a kind a backend serves; no two share a name."""
        out = []
        for spec in self.models:
            if not spec.path.exists():
                out.append(f"--model {spec.path}: no such file or directory")
            elif self.backend == "auto":
                try:
                    detect(spec.path)  # a wrong kind of file fails here, not after the server has started
                except (ValueError, OSError) as e:
                    out.append(f"--model {spec.path}: {e}")
        names = [s.name for s in self.models]
        if len(set(names)) != len(names):
            out.append(f"--model: two models share a name ({', '.join(names)}); name them with NAME=PATH")
        if self.draft_model is not None:
            out += self._draft_problems()
        return out

    def files(self) -> list[ModelSpec]:
        """Every model the server loads, the draft model among them (each GGUF is checked against its digest)."""
        return [*self.models, *([ModelSpec("draft", self.draft_model, "llamacpp")] if self.draft_model else [])]

    def _draft_problems(self) -> list[str]:
        """The draft is a GGUF, it has something to draft, and its vocabulary is each llama.cpp model's."""
        draft = self.draft_model
        if not draft.is_file() or draft.suffix != ".gguf":
            return [f"--draft-model {draft}: not a GGUF file"]
        if not self.speculate:
            return [f"--draft-model {draft}: give --speculate N, the tokens it drafts per step"]
        out = []
        for spec in self.models:
            if spec.path.is_file() and spec.path.suffix == ".gguf":
                if (why := vocabulary_difference(spec.path, draft)) is not None:
                    out.append(f"--draft-model {draft}: its vocabulary is not that of --model {spec.path}: {why}")
        return out


def read(argv: Sequence[str], environ: Mapping[str, str] | None = None, check: bool = True) -> Settings:
    """Settings from a command line and the environment (aegis.cli.parse), each model given --backend."""
    settings = cli.parse(Settings, argv, prog=PROG, environ=environ, check=check)
    return dataclasses.replace(
        settings, models=[dataclasses.replace(m, backend=settings.backend) for m in settings.models]
    )
