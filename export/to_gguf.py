"""Write a merged Hugging Face model directory as GGUF with the `gguf` package.

Tensors are streamed: the writer first records every tensor's name, shape and type (from the safetensors headers,
no data), writes the header, then reads, converts and writes one tensor at a time, so a 3.8 B model never has a
second copy in memory. Floating-point types and the legacy block quants are made here in Python; K-quants are made
from a float GGUF by llama.cpp's own quantizer (see quantize.py)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aegis.atomic import atomic_file

from . import names, vocab as vocab_mod
from .files import ExportError
from .hparams import HParams, hparams, read_config


# ---- tensors ------------------------------------------------------------------------------------------------------


class TensorSource:
    """Lazy access to a model directory's safetensors (one file or an index of shards)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{model_dir}: no *.safetensors weights")
        self._handles = {f: safe_open(str(model_dir / f), "pt") for f in files}
        self.where = {}
        for f, h in self._handles.items():
            for name in h.keys():
                self.where[name] = f

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def load(self, name: str) -> np.ndarray:
        return self._handles[self.where[name]].get_tensor(name).float().numpy()


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates the two halves of each head; llama.cpp's llama graph rotates adjacent pairs. Reorder rows so
    that the pairs llama.cpp rotates are the ones HF rotates."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class Planned:
    gguf: str
    hf: str | None  # None for generated tensors (rope factors)
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    data: np.ndarray | None = None  # generated tensors only


def _is_norm_or_1d(gguf_name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 1 or "norm" in gguf_name


def _choose_type(target, gguf_name: str, shape: tuple[int, ...], fallbacks: list[str]):
    """The type a tensor is written in: 1-D and norm tensors stay F32 (llama.cpp expects it, and they are tiny);
    a row length the block size does not divide falls back to F16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if _is_norm_or_1d(gguf_name, shape):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[target][0]
    if shape[-1] % block:
        fallbacks.append(f"{gguf_name} {list(shape)}: row length {shape[-1]} is not a multiple of {block}; F16")
        return Q.F16
    return target


def _sort_key(gguf_name: str):
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    if m:
        return (1, int(m.group(1)), gguf_name)
    return (0 if gguf_name.startswith(("token_embd", "rope_")) else 2, 0, gguf_name)


def plan_tensors(src: TensorSource, hp: HParams, target, fallbacks: list[str]) -> list[Planned]:
    import gguf

    # gguf-py's name map for the architecture; a tensor it cannot name is an error (it would be silently lost)
    namer = names.tensor_namer(hp.model_type, hp.n_layer)
    table = {n: namer(n) for n in src.where if not n.endswith("rotary_emb.inv_freq")}
    unknown = [n for n, g in table.items() if g is None]
    if unknown:
        raise ExportError(
            f"tensors with no GGUF name for {hp.model_type}: {', '.join(sorted(unknown)[:8])}"
            f"{' ...' if len(unknown) > 8 else ''}"
        )
    plan = [Planned(g, n, src.shape(n), None) for n, g in table.items()]
    for p in plan:
        p.qtype = _choose_type(target, p.gguf, p.shape, fallbacks)
    if names.FAMILIES[hp.model_type]["longrope"] and hp.rope_type in ("longrope", "su"):
        for gname, key in ((names.ROPE_FACTORS_LONG, "long_factor"), (names.ROPE_FACTORS_SHORT, "short_factor")):
            factors = hp.rope.get(key)
            if not factors or len(factors) != hp.rope_dims // 2:
                raise ExportError(
                    f"config.json: rope {key} has {len(factors or [])} values, expected "
                    f"{hp.rope_dims // 2} (rope dimensions / 2)"
                )
            data = np.asarray(factors, dtype=np.float32)
            plan.append(Planned(gname, None, data.shape, gguf.GGMLQuantizationType.F32, data))
    plan.sort(key=lambda p: _sort_key(p.gguf))
    return plan


def convert(p: Planned, src: TensorSource, hp: HParams) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    data = p.data if p.data is not None else src.load(p.hf)
    if names.FAMILIES[hp.model_type]["permute_qk"]:
        if p.gguf.endswith(("attn_q.weight", "attn_q.bias")):
            data = permute_qk(data, hp.n_head)
        elif p.gguf.endswith(("attn_k.weight", "attn_k.bias")):
            data = permute_qk(data, hp.n_head_kv)
    if p.qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if p.qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), p.qtype)


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
    progress: bool = True,
    log=print,
    label: str | None = None,
) -> WriteResult:
    """Write `model_dir` as GGUF of a Python-made type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1)."""
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
    counts: dict[str, int] = {}
    infos = []  # (name, shape, dtype, bytes, raw type): known before a byte is written, so is the size
    for p in plan:
        if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dt = np.dtype(np.float32 if p.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            infos.append((p.gguf, p.shape, dt, int(np.prod(p.shape)) * dt.itemsize, None))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
            infos.append((p.gguf, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), p.qtype))
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
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
