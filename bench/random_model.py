"""A model directory shaped like Phi-3.5-mini (3.8 B parameters, LongRoPE, fused projections) with random weights and
the embedded model's tokenizer, for benchmarks that need the real model's size but not its answers; then our own
exporter makes the GGUF:

    python bench/random_model.py OUT_DIR [--layers 32] [--hidden 3072]
    python -m export gguf --model OUT_DIR --out phi35-shaped-q8_0.gguf --type q8_0 --skip-parity

The vocabulary is Phi-3.5's size (32 064 rows); the tokenizer's few thousand tokens are padded by the exporter as
Phi-3.5's own 32 011 are. The weights are drawn on the GPU when there is one (seconds) and saved in bfloat16.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHI35 = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=131072,
    original_max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
)


def build(out: Path, layers: int, hidden: int) -> Path:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from aegis import tiny

    src = tiny.ensure(log=lambda m: print(m, file=sys.stderr))
    arch = PHI35 | {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": hidden * PHI35["intermediate_size"] // PHI35["hidden_size"],
        "num_attention_heads": hidden // 96,
        "num_key_value_heads": hidden // 96,
    }
    short, long = tiny._rope_factors(48)  # head_dim 96, as Phi-3.5's
    config = Phi3Config(
        **{k: v for k, v in arch.items() if k != "rope_theta"},
        rope_parameters={
            "rope_type": "longrope",
            "short_factor": short,
            "long_factor": long,
            "rope_theta": arch["rope_theta"],
            "factor": arch["max_position_embeddings"] / arch["original_max_position_embeddings"],
        },
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in src.iterdir():  # the tokenizer and its template, not the tiny model's config or weights
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja"):
            shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {n / 1e9:.2f} B parameters, {layers} layers, hidden {hidden}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=PHI35["num_hidden_layers"])
    ap.add_argument("--hidden", type=int, default=PHI35["hidden_size"], help="a multiple of 96 (head size)")
    args = ap.parse_args(argv)
    if args.layers < 1 or args.hidden < 96 or args.hidden % 96:
        ap.error("--layers must be positive and --hidden a positive multiple of 96")
    build(args.out, args.layers, args.hidden)
    return 0


if __name__ == "__main__":
    sys.exit(main())
