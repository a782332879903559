"""llama.cpp, loaded one way for every stage: the C++ runtime first, weights with the CPU's fast paths where they are
safe, and a crash in a child process rather than in ours.

Why the C++ runtime first: some builds of llama-cpp-python (seen on an AMX Xeon whose compiler links pieces of the
C++ library into libggml.so) export copies of libstdc++ internals from libggml.so. libllama.so then binds
`std::ostream` calls to those copies, whose locale was never initialised, and the process dies with SIGSEGV while
llama.cpp prints the model's description - at the first load of any GGUF, in export's parity step and in the server.
Putting the real libstdc++ in the global symbol scope before llama.cpp loads makes those calls bind to it.

Why a probe: a native crash cannot be caught in-process. Before export trusts a GGUF and before the server takes
requests, a child process loads the file and decodes a few tokens with the settings the product uses; a crash
there becomes an error that names the file, its type, the signal and the CPU features of the llama.cpp build.
The probe first keeps llama.cpp's extra CPU buffer types (AMX / repacked weights: on a 16-core AMX Xeon they make
a Phi-3.5-mini-shaped q8_0 decode 1.34x and read prompts 2.4x faster, BENCHMARKS.md); only if that child crashes
and the same file decodes without them does the product load it without them, and it says so.

Why one context rule and one greedy decoder here: the server and export's parity must open a GGUF in the same
context (a LongRoPE model's rope factors depend on it, see Context) and decode the same way, or export would check
replies the server does not give. `Context.default` is the server's default context; `greedy()` decodes as the
server does, with its context parameters (`context_params()`), and export records what it gives.

    python -m aegis.llamacpp probe FILE.gguf [--no-extra-bufts]     the child's side (prints one JSON line)
"""

from __future__ import annotations

import argparse
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

from .errors import AegisError

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


# A long-context model's whole context would reserve a large KV cache per request: unless asked, at most this many.
CONTEXT_CAP = 4096
# llama.cpp rounds each sequence's context up to a multiple of this before it picks LongRoPE's factors.
CONTEXT_PAD = 256


@dataclass(frozen=True)
class Context:
    """A GGUF's context lengths, and the one rule for the context the product opens it with: the server by default,
    and export's parity for the replies it records, so that what is served is what export checked.

    LongRoPE (Phi-3's long and short rope factors): llama.cpp picks the factors once per context, the long ones
    whenever a sequence's context exceeds the original one; transformers picks them per sequence, by its length.
    Opened with more than the original context, llama.cpp applies the long factors to every prompt, short ones too,
    and replies differ from transformers' and from what export checked. So a LongRoPE model's default is its
    original context (Phi-3.5-mini: 4096 of 131072; the embedded tiny model: 512 of 2048)."""
    length: int | None  # {arch}.context_length: the longest context the model was made for
    original: int | None  # LongRoPE models only: the original context, above which the long factors apply

    @property
    def default(self) -> int:
        if self.original:
            fit = self.original - self.original % CONTEXT_PAD  # so llama.cpp's rounding stays within it
            return min(fit or self.original, CONTEXT_CAP)
        return min(self.length or CONTEXT_CAP, CONTEXT_CAP)

    def long_factors(self, n_ctx: int) -> bool:
        """Whether llama.cpp, given n_ctx positions per sequence, applies the long factors to every prompt."""
        padded = -(-n_ctx // CONTEXT_PAD) * CONTEXT_PAD
        return bool(self.original) and padded > self.original

    def warning(self, n_ctx: int) -> str | None:
        """What a context of n_ctx changes from the default, in words; None when nothing."""
        if self.long_factors(n_ctx):
            return (f"a context of {n_ctx} is above this LongRoPE model's original {self.original}, so llama.cpp "
                    f"applies the long rope factors to every prompt, short ones too (transformers uses them only "
                    f"for sequences past {self.original} tokens): replies may differ from what export checked in "
                    f"a context of {self.default}")
        if self.length and n_ctx > self.length:
            return (f"a context of {n_ctx} is above the {self.length} positions this model was made for: past "
                    f"those, replies are untested")
        return None


def context(path: Path | str) -> Context:
    """The context lengths in a GGUF's metadata (read without loading llama.cpp)."""
    import gguf  # imported here: only the commands that open a GGUF need it

    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.fields[gguf.Keys.General.ARCHITECTURE].parts[-1]).decode()

    def value(key: str) -> int | None:
        f = reader.fields.get(key.format(arch=arch))
        return int(f.parts[-1][0]) if f is not None else None

    longrope = any(t.name.startswith("rope_factors_long") for t in reader.tensors)
    return Context(value(gguf.Keys.LLM.CONTEXT_LENGTH),
                   value(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN) if longrope else None)


def trained_context(path: Path | str) -> int | None:
    """The longest context in which llama.cpp runs the model as transformers does at every length: a LongRoPE
    model's original context, else its context length (an Ollama Modelfile's num_ctx)."""
    c = context(path)
    return c.original or c.length


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


def context_params(n_ctx: int, slots: int, n_batch: int, threads: int):
    """The context the server decodes in: n_ctx positions for each of `slots` sequences, each in cells of its own,
    and llama.cpp's defaults for the rest (its choice of flash attention, an F16 KV cache). greedy() uses the same,
    so export records the replies the server gives."""
    lib = runtime()
    cp = lib.llama_context_default_params()
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
    return buf.raw[:max(n, 0)]


@dataclass(frozen=True)
class Reply:
    ids: list[int]  # every token decoded, end-of-generation ones and what follows them included
    text: str  # the text of the tokens before the first end-of-generation token


def greedy(path: Path | str, prompts: list[list[int]], n_tokens: int, n_ctx: int, extra_bufts: bool = True,
           threads: int = 1, n_batch: int = 512, gpu_layers: int = -1) -> list[Reply]:
    """Each prompt's first n_tokens greedy tokens, decoded step by step as the server decodes one request
    (serve/batch.py): the prompt but its last token in chunks of n_batch, then the last token alone, then each
    chosen token alone."""
    import numpy as np  # imported here: the core's import stays light

    lib = runtime()
    model = load_model(path, extra_bufts, gpu_layers)
    ctx = lib.llama_init_from_model(model, context_params(n_ctx, 1, n_batch, threads))
    if not ctx:
        lib.llama_model_free(model)
        raise RuntimeError(f"{path}: llama.cpp could not make a context of {n_ctx} tokens")
    batch = lib.llama_batch_init(n_batch, 0, 1)
    vocab = lib.llama_model_get_vocab(model)
    n_vocab = lib.llama_vocab_n_tokens(vocab)

    def step(tokens: list[int], pos: int, want: bool) -> None:
        for j, token in enumerate(tokens):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, pos + j, 1
            batch.seq_id[j][0] = 0
            batch.logits[j] = want and j == len(tokens) - 1
        batch.n_tokens = len(tokens)
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError(f"{path}: llama_decode failed")

    out = []
    try:
        for prompt in prompts:
            if len(prompt) + n_tokens > n_ctx:
                raise ValueError(f"a prompt of {len(prompt)} tokens and {n_tokens} more exceed {n_ctx}")
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            for i in range(0, len(prompt) - 1, n_batch):
                step(prompt[i:min(i + n_batch, len(prompt) - 1)], i, False)
            token, pos, got = prompt[-1], len(prompt) - 1, []
            while len(got) < n_tokens:
                step([token], pos, True)
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, 0), shape=(n_vocab,))
                token, pos = int(logits.argmax()), pos + 1  # the first of equal logits, as llama.cpp's greedy
                got.append(token)
            end = next((i for i, t in enumerate(got) if lib.llama_vocab_is_eog(vocab, t)), len(got))
            text = b"".join(piece(vocab, t) for t in got[:end]).decode("utf-8", "replace")
            out.append(Reply(got, text))
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    return out


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
        note = (f"llama.cpp {first} decoding {Path(name).name} with its extra CPU buffer types (AMX / repacked "
                f"weights); it decodes without them, so they stay off for this file")
        log(f"warning: {note}")
        return Probe(str(path), False, note)
    tail = (err2 or err).strip().splitlines()[-6:]
    raise LlamaCrash(
        f"{name}: llama.cpp could not load and decode this {_gguf_type(path)} GGUF ({first} with the extra CPU "
        f"buffer types, {_describe(rc2)} without them). llama.cpp build: {system_info()}"
        + ("\n  " + "\n  ".join(tail) if tail else ""))


def _probe_here(path: str, extra_bufts: bool, threads: int | None) -> dict:
    llm = open_model(path, extra_bufts=extra_bufts, n_ctx=128, n_batch=64, n_ubatch=64, logits_all=False,
                     verbose=False, n_threads=threads, n_threads_batch=threads)
    n_vocab = llm.n_vocab()
    prompt = [(7 * i + 11) % n_vocab for i in range(PROBE_TOKENS)]
    llm.eval(prompt)
    for tok in prompt[:PROBE_DECODE]:
        llm.eval([tok])
    return {"ok": True, "tokens": len(prompt) + PROBE_DECODE, "extra_bufts": extra_bufts}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m aegis.llamacpp")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="load FILE.gguf and decode a few tokens (what the product's checks run)")
    p.add_argument("path")
    p.add_argument("--no-extra-bufts", action="store_true")
    p.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    print(json.dumps(_probe_here(args.path, not args.no_extra_bufts, args.threads)))


if __name__ == "__main__":
    main()
