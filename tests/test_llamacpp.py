"""llama.cpp as the product loads it: every GGUF type export offers decodes, and a native crash is a clear error.

The crash tests make llama.cpp's decode really fault (a read of address 0 inside the llama_decode call, through a
sitecustomize on the child's path), so the child process dies by SIGSEGV as it would on a broken build."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aegis import gguf_context, llamacpp
from export import names
from export.pipeline import export_gguf
from support.commands import python_m

ROOT = Path(__file__).resolve().parents[1]

CRASHER = textwrap.dedent("""
    # Makes llama_decode fault for real (SIGSEGV) when the model was loaded in the way CRASH_WHEN names.
    import ctypes, os
    from aegis import llamacpp
    llamacpp.runtime()  # as the product loads it
    import llama_cpp.llama_cpp as C

    _load, _decode = C.llama_model_load_from_file, C.llama_decode
    _state = {"extra": None}

    def load(path, params):
        _state["extra"] = bool(params.use_extra_bufts)
        return _load(path, params)

    def decode(ctx, batch):
        when = os.environ["CRASH_WHEN"]
        if when == "always" or (when == "extra_bufts" and _state["extra"]):
            ctypes.string_at(0)
        return _decode(ctx, batch)

    C.llama_model_load_from_file, C.llama_decode = load, decode
""")


def _crash_env(tmp_path: Path, when: str) -> dict:
    site = tmp_path / "crash_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(CRASHER)
    path = [str(site), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "CRASH_WHEN": when}


def _export_q8_0(tiny_path: Path, out: Path, tmp_path: Path, crash: str):
    """`python -m export gguf` of the tiny model to OUT/m.gguf in q8_0, with llama.cpp crashing as `crash` says."""
    args = ("--model", tiny_path, "--out", out / "m.gguf", "--type", "q8_0", "--no-progress")
    return python_m("export", "gguf", *args, env=_crash_env(tmp_path, crash))


def test_llama_cpp_is_loaded_only_through_the_runtime():
    """aegis.llamacpp.runtime() puts the real C++ runtime in the global symbol scope before llama.cpp's libraries
    load. Anything that imports llama_cpp before it undoes that: a CUDA build's std::ostream calls then bind to the
    libstdc++ copies libggml-cuda.so exports and crash in llama_model::print_info, even for an import of llama_cpp's
    grammar module alone. So no product module imports llama_cpp at its top level, and importing the entry points
    leaves it unloaded."""
    import ast

    offenders = []
    for pkg in ("aegis", "serve", "export", "train", "bench"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "aegis" / "llamacpp.py":
                continue
            for node in ast.parse(path.read_text()).body:
                mods = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if any(m == "llama_cpp" or m.startswith("llama_cpp.") for m in mods):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], f"top-level llama_cpp imports (use aegis.llamacpp.runtime()): {offenders}"
    code = (
        "import sys, serve.app, serve.structured, serve.__main__, export.__main__, export.quantize, "
        "export.vocab; print('llama_cpp' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False", "importing the entry points loaded llama_cpp before runtime()"


def test_every_offered_type_loads_and_decodes(tiny_path, tmp_path):
    """Every --type of `export gguf`, written from the embedded model, loads and decodes through the product's
    loader (probe in a child, then the settings it chose). The CPU features of the llama.cpp build are printed, so
    the log says where it ran (AMX or not). Besides CI's CPU it passed on an AMX CPU (AMX_INT8, REPACK: the GPU
    machine's, llama.cpp built there natively; BENCHMARKS.md, "llama.cpp on a CPU with AMX")."""
    print(f"llama.cpp build: {llamacpp.system_info()}")
    for t in names.TYPES:
        path = tmp_path / f"tiny-{t}.gguf"
        export_gguf(tiny_path, path, t, progress=False, check_parity=False, log=lambda *_: None)
        loader = llamacpp.probe(path)
        assert loader.extra_bufts, f"{t}: the fast CPU paths were turned off: {loader.note}"
        llm = llamacpp.open_model(path, extra_bufts=loader.extra_bufts, n_ctx=64, verbose=False)
        try:
            ids = llm.tokenize("日本の秋は".encode(), add_bos=False)
            out = [tok for tok, _ in zip(llm.generate(ids, temp=0.0, top_k=1), range(4))]
            assert len(out) == 4 and all(0 <= tok < llm.n_vocab() for tok in out), t
        finally:
            llm.close()


def test_a_crash_in_llama_cpp_is_a_clear_error_and_leaves_no_file(tiny_path, tmp_path):
    out = tmp_path / "out"
    proc = _export_q8_0(tiny_path, out, tmp_path, "always")
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr
    assert "m.gguf" in err and "Q8_0" in err and "SIGSEGV" in err, err[-2000:]
    assert "llama.cpp build:" in err and "AVX" in err, err[-2000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [], "a temporary file was left behind"


def test_fast_cpu_paths_are_dropped_only_when_they_crash(tiny_path, tmp_path):
    """A build whose extra buffer types crash still exports: the probe falls back, says so, and parity runs."""
    out = tmp_path / "out"
    proc = _export_q8_0(tiny_path, out, tmp_path, "extra_bufts")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    text = proc.stdout + proc.stderr
    assert "killed by SIGSEGV" in text and "stay off for this file" in text
    assert (out / "m.gguf").is_file()


@pytest.mark.parametrize("extra", [True, False])
def test_loader_settings_reach_llama_cpp(tiny_path, tmp_path, extra):
    """open_model really passes the extra-buffer-type choice to llama.cpp (seen by the crashing hook's record)."""
    path = tmp_path / "m.gguf"
    export_gguf(tiny_path, path, "q8_0", progress=False, check_parity=False, log=lambda *_: None)
    code = (
        "from aegis import llamacpp; import sys; "
        f"m = llamacpp.open_model(sys.argv[1], extra_bufts={extra}, n_ctx=32, verbose=False); m.eval([5, 6])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_crash_env(tmp_path, "extra_bufts"),
        timeout=300,
    )
    assert (proc.returncode == -11) == extra, (proc.returncode, proc.stderr[-1000:])


def test_the_server_says_what_failed_when_llama_cpp_crashes(tiny_path, tmp_path):
    """`serve` checks at start-up that the model decodes; a native crash there is a one-line error and exit 1."""
    path = tmp_path / "m.gguf"
    export_gguf(tiny_path, path, "q8_0", progress=False, check_parity=False, log=lambda *_: None)
    proc = python_m("serve", "--model", path, "--port", "18677", env=_crash_env(tmp_path, "always"), timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "could not load the model" in proc.stderr and "SIGSEGV" in proc.stderr and str(path) in proc.stderr


def _metadata_gguf(path: Path, length: int, original: int | None) -> Path:
    """A GGUF of a Phi-3's context metadata alone (and, for LongRoPE, its long-factor tensor): all the rule reads."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_context_length(length)
    if original:
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_tensor("rope_factors_long.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "length, original, default",
    [
        (2048, 512, 512),  # the embedded tiny model: trained at 512, LongRoPE to 2048
        (131072, 4096, 4096),  # Phi-3.5-mini (Borea): the original context, not the 4096 cap by chance
        (131072, None, 4096),  # a long context without LongRoPE: capped
        (2048, None, 2048),  # a short one: its own
        (131072, 3000, 2816),  # an original off llama.cpp's 256-position rounding: rounded down to stay within it
    ],
)
def test_the_default_context_keeps_longrope_on_its_short_factors(tmp_path, length, original, default):
    rule = gguf_context.context(_metadata_gguf(tmp_path / "m.gguf", length, original))
    assert (rule.length, rule.original, rule.default) == (length, original, default)
    assert not rule.long_factors(rule.default) and rule.warning(rule.default) is None
    if original:
        assert rule.long_factors(original + 1) and "long rope factors to every prompt" in rule.warning(original + 1)
        assert gguf_context.trained_context(tmp_path / "m.gguf") == original
    assert (rule.warning(length + 1) or "") != ""
