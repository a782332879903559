"""Which tensors a GGUF holds and how each is made: a model directory's safetensors read lazily (`TensorSource`),
each tensor's GGUF name, shape and type planned before any data is read (`plan_tensors`, `tensor_infos`), then
converted one at a time as export/to_gguf.py writes it (`convert`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import names
from .files import ExportError
from .hparams import HParams


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


def tensor_infos(plan: list[Planned]) -> tuple[list[tuple], dict[str, int]]:
    """Each tensor's (name, shape, dtype, bytes, raw type), known before a byte is written (so is the file's size),
    and how many tensors of each type the plan holds."""
    import gguf

    counts: dict[str, int] = {}
    infos = []
    for p in plan:
        if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dt = np.dtype(np.float32 if p.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            infos.append((p.gguf, p.shape, dt, int(np.prod(p.shape)) * dt.itemsize, None))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
            infos.append((p.gguf, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), p.qtype))
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    return infos, counts
