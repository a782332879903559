"""What making a llama.cpp context tells, read for the log: where the layers went, what llama.cpp logged while it
made the context (the server drops its log otherwise), and the KV cache's size from that log."""

from __future__ import annotations

import ctypes
import re

KV_SIZE = re.compile(r"K \((\w+)\):\s*([\d.]+) MiB, V \((\w+)\):\s*([\d.]+) MiB")  # llama.cpp's KV cache line


def placement(lib, model, gpu_layers: int) -> str:
    """Where the layers went, counted as llama.cpp counts them (the output layer is one more)."""
    total = lib.llama_model_n_layer(model) + 1
    if not lib.llama_supports_gpu_offload():
        return "CPU only (this llama.cpp build has no GPU backend)"
    on_gpu = total if gpu_layers < 0 else min(gpu_layers, total)
    return f"{on_gpu}/{total} layers on the GPU" + ("" if on_gpu == total else " (--n-gpu-layers)")


def logged(lib, make):
    """make()'s result and what llama.cpp logged meanwhile (the server drops its log otherwise)."""
    said, previous, data = [], lib.llama_log_callback(), ctypes.c_void_p()
    lib.llama_log_get(ctypes.byref(previous), ctypes.byref(data))

    @lib.llama_log_callback
    def keep(level, text, user_data):  # noqa: ARG001
        said.append(text.decode("utf-8", "replace"))

    lib.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        return make(), "".join(said)
    finally:
        lib.llama_log_set(previous, data)


def kv_mib(said: str) -> float | None:
    """llama.cpp's own account of the memory its KV cache took (K and V of each cache it made), from its log."""
    return sum(float(m[1]) + float(m[3]) for m in KV_SIZE.findall(said)) or None
