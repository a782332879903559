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

    python -m aegis.llamacpp probe FILE.gguf [--no-extra-bufts]     the child's side (prints one JSON line)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
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


def trained_context(path: Path | str) -> int | None:
    """The context a GGUF should be opened with unless asked otherwise: its context length, but for a LongRoPE model
    (Phi-3: long and short rope factors) the original context. llama.cpp picks the factors once per context, not per
    sequence as transformers does: with a context above the original it applies the long factors to every prompt,
    short ones too, which then differ from what the model was trained and is run with elsewhere."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.fields[gguf.Keys.General.ARCHITECTURE].parts[-1]).decode()
    keys = [gguf.Keys.LLM.CONTEXT_LENGTH]
    if any(t.name.startswith("rope_factors_long") for t in reader.tensors):
        keys.insert(0, gguf.Keys.Rope.SCALING_ORIG_CTX_LEN)
    for key in keys:
        f = reader.fields.get(key.format(arch=arch))
        if f is not None:
            return int(f.parts[-1][0])
    return None


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
