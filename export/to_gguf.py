"""Write a merged Hugging Face model directory as GGUF with the `gguf` package.

Tensors are streamed: the writer first records every tensor's name, shape and type (from the safetensors headers,
no data), writes the header, then reads, converts and writes one tensor at a time, so a 3.8 B model never has a
second copy in memory. Floating-point types and the legacy block quants are made here in Python; K-quants are made
from a float GGUF by llama.cpp's own quantizer (see quantize.py)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path


from aegis.atomic import atomic_file

from . import names, vocab as vocab_mod
from .files import ExportError
from .hparams import HParams, hparams, read_config
from .tensor_plan import TensorSource, convert, plan_tensors, tensor_infos


# ---- metadata -----------------------------------------------------------------------------------------------------


def _name_for_llama_cpp(name: str, vocab: vocab_mod.Vocab) -> tuple[str, str | None]:
    """llama.cpp gives every special token Phi-3's rstrip attribute (and looks up <s>, </s>, <unk> and
    <|endoftext|> by text) when general.name contains "phi3" or "phi-3". Name the model so that llama.cpp does that
    exactly when the HF tokenizer behaves so. Returns (name, note)."""
    lowered = name.lower()
    has = "phi3" in lowered or "phi-3" in lowered
    if vocab.specials_rstrip and not has:
        missing = [t for t in ("<s>", "</s>", "<unk>", "<|endoftext|>") if t not in vocab.tokens]
        if missing:
            raise ExportError(
                f"the tokenizer's special tokens strip the whitespace after them (as Phi-3's do), "
                f"which llama.cpp reproduces only for a model named phi3, and that needs tokens "
                f"{', '.join(missing)} that this vocabulary lacks"
            )
        return (
            f"{name}-phi3",
            "general.name gets '-phi3' so llama.cpp strips whitespace after special tokens as HF does",
        )
    if not vocab.specials_rstrip and has:
        fixed = re.sub(r"(?i)phi-?3", "phi_3", name)
        return fixed, "general.name avoids 'phi3' so llama.cpp keeps whitespace after special tokens as HF does"
    return name, None


def write_metadata(writer, hp: HParams, vocab: vocab_mod.Vocab, name: str, file_type: int) -> list[str]:
    import gguf

    notes = list(vocab.notes)
    gname, note = _name_for_llama_cpp(name, vocab)
    if note:
        notes.append(note)
    writer.add_name(gname)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_block_count(hp.n_layer)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_dimension_count(hp.rope_dims)
    writer.add_rope_freq_base(hp.rope_theta)
    if names.FAMILIES[hp.model_type]["longrope"]:
        # a LongRoPE family's metadata llama.cpp reads: original context (picks short/long factors), sliding window
        # (0 = none)
        orig = hp.n_ctx_orig or hp.n_ctx
        writer.add_rope_scaling_orig_ctx_len(orig)
        writer.add_sliding_window(hp.sliding_window or 0)
        if hp.rope_type in ("longrope", "su"):
            scale = hp.n_ctx / orig
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        elif hp.rope_type != "default":
            raise ExportError(f"config.json: rope type {hp.rope_type!r} is not supported for {hp.model_type}")
    elif hp.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))
    elif hp.rope_type != "default":
        raise ExportError(f"config.json: rope type {hp.rope_type!r} is not supported for {hp.model_type}")
    vocab_mod.write(writer, vocab)
    return notes


# ---- the whole file -----------------------------------------------------------------------------------------------


@dataclass
class WriteResult:
    path: str
    type: str
    tensors: int
    tensor_types: dict[str, int]
    fallbacks: list[str]
    notes: list[str]
    bytes: int


def default_name(model_dir: Path) -> str:
    return Path(model_dir).resolve().name


def write_gguf(
    model_dir: Path,
    out: Path,
    out_type: str,
    name: str | None = None,
    label: str | None = None,
    progress: bool = True,
    log=print,
) -> WriteResult:
    """Write `model_dir` as GGUF of a Python-made type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1). `name` is the
    file's general.name (default: the model directory's name), `label` what the log calls `out` (default: its path)."""
    import gguf

    if out_type not in names.PYTHON_TYPES:
        raise ExportError(f"write_gguf: --type {out_type!r} is not made in Python (internal)")
    model_dir, out = Path(model_dir), Path(out)
    cfg = read_config(model_dir)
    hp = hparams(cfg, str(model_dir / "config.json"))
    vocab = vocab_mod.build(model_dir, cfg)
    if vocab.model == "gpt2":
        out.parent.mkdir(parents=True, exist_ok=True)
        vocab_mod.choose_pre(vocab, vocab.tokenizer, lambda p: _write_vocab_only(p, hp, vocab), out.parent)
    src = TensorSource(model_dir)
    target = names.PYTHON_TYPES[out_type]
    fallbacks: list[str] = []
    plan = plan_tensors(src, hp, target, fallbacks)
    infos, counts = tensor_infos(plan)
    needed = sum(info[3] for info in infos)  # the tensor data; the header and vocabulary add little
    with atomic_file(out, needed, shown=str(out.parent / label) if label else None) as tmp:
        writer = gguf.GGUFWriter(str(tmp), names.arch_name(hp.model_type))
        notes = write_metadata(writer, hp, vocab, name or default_name(model_dir), int(names.TYPES[out_type]))
        for gname, shape, dt, nbytes, raw in infos:
            writer.add_tensor_info(gname, shape, dt, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = _progress(plan, progress, f"gguf {out_type}")
        for p in bar:
            writer.write_tensor_data(convert(p, src, hp))
        writer.close()
        size = tmp.stat().st_size
    for f in fallbacks:
        log(f"  fallback: {f}")
    log(
        f"wrote {label or out} ({size / 2**20:.1f} MiB, {len(plan)} tensors: "
        f"{', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})"
    )
    return WriteResult(
        path=str(out),
        type=out_type,
        tensors=len(plan),
        tensor_types=counts,
        fallbacks=fallbacks,
        notes=notes,
        bytes=size,
    )


def _write_vocab_only(path: Path, hp: HParams, vocab: vocab_mod.Vocab) -> None:
    """A GGUF of metadata and vocabulary only, which llama.cpp loads with vocab_only to tokenize."""
    import gguf

    writer = gguf.GGUFWriter(str(path), names.arch_name(hp.model_type))
    write_metadata(writer, hp, vocab, "vocab-probe", int(names.TYPES["f32"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF file holds (read back with gguf's reader)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts
