"""A Phi-3 checkpoint rewritten as the same weights in LlamaForCausalLM's layout ("llamafied"): the fused `qkv_proj`
split into `q_proj`/`k_proj`/`v_proj` and `gate_up_proj` into `gate_proj`/`up_proj`, every other tensor unchanged.
Unsloth publishes its Phi-3.5 copies this way so they take its Llama kernels; the bench times both forms.

    python bench/llamafy.py PHI3_DIR OUT_DIR

Streams shard by shard through safetensors (no model is built), so a 3.8 B checkpoint converts in seconds with little
memory. The config keeps LongRoPE (its factors, `original_max_position_embeddings` at the top level, where Unsloth's
Llama path reads it) and every size; the tokenizer files are copied.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Phi-3 and Llama share these keys' meaning; everything else in the Llama config is set below.
SHARED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "rms_norm_eps",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)


def llama_config(phi3: dict) -> dict:
    """Llama config holding the Phi-3 sizes and rope. transformers 5 writes rope settings as `rope_parameters`,
    earlier releases as `rope_scaling` + `rope_theta`; both are read, and written back in the form Unsloth's own
    llamafied Phi-3.5 uses (`rope_scaling` with `type: longrope`), which transformers 5 converts on load."""
    if phi3.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("a partial rotary factor has no Llama equivalent")
    rope = dict(phi3.get("rope_parameters") or phi3.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", phi3.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    heads = phi3["num_attention_heads"]
    cfg = {k: phi3[k] for k in SHARED if k in phi3}
    cfg.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act=phi3.get("hidden_act", "silu"),
        head_dim=phi3["hidden_size"] // heads,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        rope_theta=theta,
    )
    cfg.setdefault("num_key_value_heads", heads)
    if phi3.get("dtype") or phi3.get("torch_dtype"):
        cfg["dtype"] = phi3.get("dtype") or phi3.get("torch_dtype")
    if kind == "longrope":
        cfg["original_max_position_embeddings"] = rope.pop(
            "original_max_position_embeddings", phi3.get("original_max_position_embeddings")
        )
        cfg["rope_scaling"] = {
            "type": "longrope",
            "short_factor": rope["short_factor"],
            "long_factor": rope["long_factor"],
        }
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} is not converted")
    return cfg


def split(name: str, tensor, cfg: dict) -> list[tuple[str, object]]:
    """One Phi-3 tensor as the Llama tensors it holds: rows [q; k; v] of qkv_proj, rows [gate; up] of gate_up_proj."""
    if name.endswith("self_attn.qkv_proj.weight"):
        d = cfg["hidden_size"] // cfg["num_attention_heads"]
        q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
        if tensor.shape[0] != q + 2 * kv:
            raise ValueError(f"{name}: {tensor.shape[0]} rows, expected {q + 2 * kv}")
        base = name[: -len("qkv_proj.weight")]
        return [
            (base + "q_proj.weight", tensor[:q]),
            (base + "k_proj.weight", tensor[q : q + kv]),
            (base + "v_proj.weight", tensor[q + kv :]),
        ]
    if name.endswith("mlp.gate_up_proj.weight"):
        n = cfg["intermediate_size"]
        if tensor.shape[0] != 2 * n:
            raise ValueError(f"{name}: {tensor.shape[0]} rows, expected {2 * n}")
        base = name[: -len("gate_up_proj.weight")]
        return [(base + "gate_proj.weight", tensor[:n]), (base + "up_proj.weight", tensor[n:])]
    return [(name, tensor)]


def convert(src: Path, out: Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    phi3 = json.loads((src / "config.json").read_text())
    cfg = llama_config(phi3)
    index = src / "model.safetensors.index.json"
    shards = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for shard in shards:
        tensors = {}
        with safe_open(str(src / shard), framework="pt") as f:
            for name in f.keys():
                for new, t in split(name, f.get_tensor(name), cfg):
                    tensors[new] = t.contiguous()
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        (tmp / index.name).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in src.iterdir():  # tokenizer, its template, generation config
        if f.is_file() and not f.name.startswith(("model", "config.json")):
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="a Phi3ForCausalLM directory (config.json + safetensors)")
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    out = convert(args.src, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
