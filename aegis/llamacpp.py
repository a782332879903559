"""llama.cpp, loaded one way for every stage: the C++ runtime first, weights with the CPU's fast paths where they are
safe, and a crash in a child process rather than in ours.

The C++ runtime first: a llama-cpp-python build can export copies of libstdc++ internals from libggml.so, whose
locale is never initialised; libllama.so binding `std::ostream` calls to them dies with SIGSEGV when llama.cpp
prints a model's description. With the real libstdc++ in the global symbol scope before llama.cpp loads, the calls
bind to it: `runtime()` is the only door to llama_cpp.

A probe: a native crash cannot be caught in-process, so before export trusts a GGUF and before the server takes
requests, a child process loads the file and decodes a few tokens as the product does; a crash there is an error
naming the file, its type, the signal and the build's CPU features. The child first keeps llama.cpp's extra CPU
buffer types (AMX / repacked weights, BENCHMARKS.md); only if it crashes and the file decodes without them does the
product load the file without them, and it says so.

The server's context: `load_model()` and `context_params()` are how the server loads a model and makes its
context, and aegis/decoding.py decodes with them as the server does, so export records the replies it gives.

    python -m aegis.llamacpp probe FILE.gguf [--no-extra-bufts]     the child's side (prints one JSON line)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from . import cli
from .cli import setting
from .errors import AegisError

PROG = "python -m aegis.llamacpp"
PROBE_TOKENS = 24  # a prompt batch (the batched matmul path) ...
PROBE_DECODE = 4  # ... then single-token decodes (the other path)
PROBE_TIMEOUT_S = 300
_params_lock = threading.Lock()


class LlamaCrash(AegisError):
    """llama.cpp could not load or decode a GGUF in a child process."""


def runtime():
    """The llama_cpp module, with the C++ runtime loaded into the global scope first (see the module's docstring)."""
    if "llama_cpp" not in sys.modules:
        name = ctypes.util.find_library("stdc++")
        if name:
            with contextlib.suppress(OSError):
                ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    import llama_cpp  # imported here so that the C++ runtime above is in place before llama.cpp loads

    return llama_cpp


@functools.cache
def _drop_log():
    lib = runtime()

    @lib.llama_log_callback
    def drop(level, text, user_data):  # noqa: ARG001
        pass

    return drop  # cached: llama.cpp keeps the raw pointer


def quiet() -> None:
    """Drop llama.cpp's log from now on (its loader's chatter goes straight to stderr from C otherwise)."""
    runtime().llama_log_set(_drop_log(), ctypes.c_void_p(0))


def open_vocab(path: Path | str):
    """A llama_cpp.Llama of `path`'s vocabulary and metadata alone: no weights, no decoding. llama.cpp's log is
    dropped while it loads: a vocab-only load reads no hyperparameters, so llama.cpp would warn that its context
    exceeds "n_ctx_train (0)", a possible training context overflow, which it is not (context() has the real one)."""
    lib = runtime()
    with _params_lock:  # llama.cpp's log callback is global
        callback, data = lib.llama_log_callback(), ctypes.c_void_p()
        lib.llama_log_get(ctypes.byref(callback), ctypes.byref(data))
        quiet()
        try:
            return lib.Llama(model_path=str(path), vocab_only=True, verbose=False)
        finally:
            lib.llama_log_set(callback, data)


def system_info() -> str:
    """The CPU features llama.cpp was built with and found (AVX512, AMX_INT8, REPACK, ...)."""
    return runtime().llama_print_system_info().decode("utf-8", "replace").strip()


@contextlib.contextmanager
def _model_params(extra_bufts: bool):
    """llama_cpp.Llama builds its model parameters from llama.cpp's defaults and has no argument for the extra CPU
    buffer types; set the field on the defaults it reads while one model loads."""
    llama_cpp = runtime()
    low = llama_cpp.llama_cpp
    with _params_lock:
        default = low.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = extra_bufts
            return p

        low.llama_model_default_params = params
        try:
            yield
        finally:
            low.llama_model_default_params = default


def open_model(path: Path | str, extra_bufts: bool = True, **kwargs):
    """A llama_cpp.Llama over `path` (kwargs as Llama takes them), loaded with or without the extra buffer types."""
    llama_cpp = runtime()
    with _model_params(extra_bufts):
        return llama_cpp.Llama(model_path=str(path), **kwargs)


@dataclass(frozen=True)
class Probe:
    path: str
    extra_bufts: bool  # what the product should load the file with
    note: str = ""  # set when the fast CPU paths had to be left off


def _gguf_type(path: Path) -> str:
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        ftype = int(reader.fields["general.file_type"].parts[-1][0])
        return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_")
    except Exception:  # noqa: BLE001 - only for the message; the crash is what is reported
        return "unknown type"


def load_model(path: Path | str, extra_bufts: bool, gpu_layers: int = -1):
    """A llama_model pointer (llama.cpp's low-level API), as the server loads it; free it with llama_model_free."""
    lib = runtime()
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = gpu_layers
    mp.use_extra_bufts = extra_bufts
    model = lib.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise RuntimeError(f"{path}: llama.cpp could not load the model")
    return model


CACHE_TYPES = ("f16", "q8_0")  # the KV cache types the server offers (--cache-type)


def context_params(n_ctx: int, slots: int, n_batch: int, threads: int, cache_type: str = "f16"):
    """The context the server decodes in: n_ctx positions for each of `slots` sequences, each in cells of its own,
    and llama.cpp's defaults for the rest (its choice of flash attention, an F16 KV cache). aegis/decoding.py's
    greedy() uses the same, so export records the replies the server gives. cache_type q8_0 stores K and V in
    8 bits (about half the memory); llama.cpp reads a quantized V cache only inside flash attention, so that is
    switched on rather than left to llama.cpp's choice."""
    lib = runtime()
    cp = lib.llama_context_default_params()
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"cache type {cache_type!r} is not one of {', '.join(CACHE_TYPES)}")
    if cache_type == "q8_0":
        cp.type_k = cp.type_v = lib.GGML_TYPE_Q8_0
        cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
    cp.n_ctx = n_ctx * slots
    cp.n_batch = cp.n_ubatch = n_batch
    cp.n_seq_max = slots
    cp.kv_unified = False  # each slot gets a whole context of its own
    cp.n_threads = cp.n_threads_batch = threads
    cp.no_perf = True
    return cp


def piece(vocab, token: int) -> bytes:
    """The bytes a token stands for (b"" for control tokens), from a llama_vocab pointer."""
    lib = runtime()
    buf = ctypes.create_string_buffer(64)
    n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n > len(buf):  # a piece longer than the buffer: ask again with the size it told us
        buf = ctypes.create_string_buffer(n)
        n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return buf.raw[: max(n, 0)]


def _child(path: Path, extra_bufts: bool, threads: int | None) -> tuple[int, str, str]:
    cmd = [sys.executable, "-m", "aegis.llamacpp", "probe", str(path)]
    if not extra_bufts:
        cmd.append("--no-extra-bufts")
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    root = str(Path(__file__).resolve().parents[1])  # the child imports this package as the parent did
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return -signal.SIGKILL, "", f"no answer within {PROBE_TIMEOUT_S} s"
    return done.returncode, done.stdout, done.stderr


def _describe(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
    return f"exit status {rc}"


def probe(path: Path | str, threads: int | None = None, log=print, name: str | None = None) -> Probe:
    """Load and decode `path` in a child process; the settings to load it with, or LlamaCrash. `name` is what
    messages call the file (the file a user asked for, when `path` is its temporary copy)."""
    path = Path(path)
    name = name or str(path)
    rc, out, err = _child(path, True, threads)
    if rc == 0:
        return Probe(str(path), True)
    first = _describe(rc)
    rc2, _, err2 = _child(path, False, threads)
    if rc2 == 0:
        note = (
            f"llama.cpp {first} decoding {Path(name).name} with its extra CPU buffer types (AMX / repacked "
            f"weights); it decodes without them, so they stay off for this file"
        )
        log(f"warning: {note}")
        return Probe(str(path), False, note)
    tail = (err2 or err).strip().splitlines()[-6:]
    raise LlamaCrash(
        f"{name}: llama.cpp could not load and decode this {_gguf_type(path)} GGUF ({first} with the extra CPU "
        f"buffer types, {_describe(rc2)} without them). llama.cpp build: {system_info()}"
        + ("\n  " + "\n  ".join(tail) if tail else "")
    )


def _probe_here(path: str, extra_bufts: bool, threads: int | None) -> dict:
    llm = open_model(
        path,
        extra_bufts=extra_bufts,
        n_ctx=128,
        n_batch=64,
        n_ubatch=64,
        logits_all=False,
        verbose=False,
        n_threads=threads,
        n_threads_batch=threads,
    )
    n_vocab = llm.n_vocab()
    prompt = [(7 * i + 11) % n_vocab for i in range(PROBE_TOKENS)]
    llm.eval(prompt)
    for tok in prompt[:PROBE_DECODE]:
        llm.eval([tok])
    return {"ok": True, "tokens": len(prompt) + PROBE_DECODE, "extra_bufts": extra_bufts}


@dataclass
class ProbeArgs:
    """Load FILE.gguf and decode a few tokens, as the product's checks do; prints one JSON line."""

    path: Path = setting(help="the GGUF file", metavar="FILE", positional=True, required=True)
    no_extra_bufts: bool = setting(False, "load without llama.cpp's extra CPU buffer types (AMX / repacked weights)")
    threads: int | None = setting(None, "CPU threads (default: llama.cpp's)", parse=cli.bounded(int, 1))


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        _, args = cli.parse_command(
            {"probe": ProbeArgs},
            sys.argv[1:] if argv is None else argv,
            prog=PROG,
            description="The child's side of llama.cpp's crash probe.",
        )
        print(json.dumps(_probe_here(str(args.path), not args.no_extra_bufts, args.threads)))

    return cli.main(body)


if __name__ == "__main__":
    sys.exit(main())
