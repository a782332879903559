"""A merged model's hyperparameters as the GGUF writer needs them, read from its config.json (transformers 4 and 5
spellings, nested text configs)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import names
from .files import ExportError


@dataclass
class HParams:
    model_type: str
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dims: int
    rms_eps: float
    rope_theta: float
    n_ctx_orig: int | None = None
    rope: dict = field(default_factory=dict)  # the rope scaling dict, whichever key held it
    rope_type: str = "default"
    sliding_window: int | None = None


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ExportError(
            f"{path}: missing; --model must be a Hugging Face model directory (e.g. from `python -m export merge`)"
        )
    return json.loads(path.read_text())


def hparams(cfg: dict, where: str = "config.json") -> HParams:
    cfg = {**cfg, **cfg.get("text_config", {})}
    model_type = cfg.get("model_type")
    if model_type not in names.FAMILIES:
        raise ExportError(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(names.FAMILIES)})"
        )
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
        if k not in cfg
    ]
    if missing:
        raise ExportError(f"{where}: missing {', '.join(missing)}")
    # transformers 5 writes rope settings under rope_parameters; older configs (and the hub's Phi-3 ones) use
    # rope_scaling plus top-level rope_theta / original_max_position_embeddings.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = (rope.get("rope_type") or rope.get("type") or "default").lower()
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    return HParams(
        model_type=model_type,
        n_vocab=cfg["vocab_size"],
        n_ctx=cfg["max_position_embeddings"],
        n_embd=cfg["hidden_size"],
        n_ff=cfg["intermediate_size"],
        n_layer=cfg["num_hidden_layers"],
        n_head=n_head,
        n_head_kv=cfg.get("num_key_value_heads") or n_head,
        head_dim=head_dim,
        rope_dims=int(cfg.get("partial_rotary_factor", 1.0) * head_dim),
        rms_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        n_ctx_orig=cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings"),
        rope=rope,
        rope_type=rope_type,
        sliding_window=cfg.get("sliding_window"),
    )
