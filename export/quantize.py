"""K-quants (q4_k_m, q5_k_m, q6_k, ...) from llama.cpp's own quantizer, called through llama-cpp-python.

gguf-py cannot make K-quants, and llama.cpp's quantizer also picks mixed types per tensor (e.g. q6_k for some
ffn_down rows in q4_k_m). The input is a float GGUF of the merged model's own precision, so nothing is rounded
twice. llama.cpp falls back to another type for tensors whose rows are not a multiple of 256; what it did is
captured from its log and reported."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from pathlib import Path

from aegis import llamacpp
from aegis.atomic import atomic_file
from aegis.errors import no_space, out_of_room

from . import names
from .files import ExportError

FULL_BELOW = 1 << 20  # free bytes under which a failed write is taken for a full file system


def _no_room(tmp: Path, written: int, log: str) -> int | None:
    """Why llama.cpp's write stopped, if for want of room (ENOSPC, EFBIG): its writer may report a failed write
    without the OS's reason, so the file system and the file-size limit are looked at too."""
    import resource

    if out_of_room(OSError(log)):
        return errno.EFBIG if "File too large" in log else errno.ENOSPC
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and written >= limit:
        return errno.EFBIG
    if shutil.disk_usage(tmp.parent).free < FULL_BELOW:
        return errno.ENOSPC
    return None


def llama_quantize(src: Path, dest: Path, out_type: str, threads: int = 0) -> list[str]:
    """Quantize GGUF `src` into `dest` (written atomically). Returns llama.cpp's fallback messages."""
    llama_cpp = llamacpp.runtime()
    from llama_cpp import _logger

    if out_type not in names.TYPES or out_type in names.PYTHON_TYPES:
        raise ExportError(f"llama_quantize: {out_type} is not a llama.cpp quantization (internal)")
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(names.TYPES[out_type])  # gguf-py's LlamaFileType values are llama.cpp's LLAMA_FTYPE_*
    params.nthread = threads
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        with atomic_file(dest) as tmp:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                tail = "".join(lines)[-2000:]
                written = tmp.stat().st_size if tmp.exists() else 0
                code = _no_room(tmp, written, tail)
                if code is not None:
                    tmp.unlink(missing_ok=True)  # first, so that the free space reported is what a retry finds
                    raise no_space(dest, OSError(code, os.strerror(code)), written=written)
                raise ExportError(f"llama.cpp could not quantize {src} to {out_type} (code {rc}):\n{tail}")
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    log = "".join(lines)
    return [m.strip() for m in re.findall(r"[^\n]*fallback[^\n]*", log, flags=re.IGNORECASE)]
