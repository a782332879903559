"""Server settings, shared by the CLI, the app factory and the tests."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class Settings:
    models: list[ModelSpec]
    api_key: str | None = None
    workers: int = 1  # model workers per model
    queue_size: int = 64  # requests that may wait for a worker, per model
    timeout: float = 300.0  # seconds per request, queue wait included
    max_body_bytes: int = 1 << 20
    ctx_size: int = 0  # 0: the model's own (capped at 4096 for llama.cpp)
    threads: int = 0  # llama.cpp threads per worker; 0: cores / workers
    gpu_layers: int = -1  # llama.cpp layers on the GPU (-1: all, where the build has a GPU)
    device: str = "auto"  # transformers backend
    dtype: str = "auto"
    quantization: str | None = None  # transformers checkpoints: nf4 | none (default: as trained)
    default_max_tokens: int = 0  # when a request gives none; 0: the rest of the context
