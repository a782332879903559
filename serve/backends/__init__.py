"""Model runtimes behind one interface (base.Backend); `open_backend` picks one from what the path holds."""

from __future__ import annotations

from pathlib import Path

from .base import Backend, Detokenizer, Sampling, Session

KINDS = ("auto", "llamacpp", "hf")


def is_checkpoint(path: Path) -> bool:
    return (path / "soul.safetensors").is_file() and (path / "adapter_config.json").is_file()


def is_hf_model(path: Path) -> bool:
    return (path / "config.json").is_file()


def detect(path: Path) -> str:
    """llamacpp for a .gguf file, hf for a model directory or a training checkpoint (read from the path alone, so
    neither runtime is imported to tell)."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "llamacpp"
        raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
    if path.is_dir() and (is_checkpoint(path) or is_hf_model(path)):
        return "hf"
    if path.is_dir():
        raise ValueError(
            f"{path}: a directory, but neither a training checkpoint (soul.safetensors + adapter) "
            f"nor a model directory (config.json)"
        )
    raise FileNotFoundError(f"{path}: no such file or directory")


def open_backend(
    path: Path,
    kind: str = "auto",
    *,
    n_ctx: int = 0,
    threads: int = 0,
    batch_size: int = 512,
    gpu_layers: int = -1,
    device: str = "auto",
    dtype: str = "auto",
    quantization: str | None = None,
) -> Backend:
    path = Path(path)
    if kind == "auto":
        kind = detect(path)
    # each runtime is imported only when a model needs it (the serve image has llama.cpp but no torch)
    if kind == "llamacpp":
        from .llamacpp import LlamaCppBackend

        return LlamaCppBackend(path, n_ctx=n_ctx, n_threads=threads, n_batch=batch_size, gpu_layers=gpu_layers)
    if kind == "hf":
        from .hf import HFBackend

        return HFBackend(path, n_ctx=n_ctx, device=device, dtype=dtype, quantization=quantization)
    raise ValueError(f"backend {kind!r} is not one of {', '.join(KINDS)}")


__all__ = ["Backend", "Detokenizer", "KINDS", "Sampling", "Session", "detect", "open_backend"]
