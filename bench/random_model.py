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

from bench.common import PHI35  # noqa: E402


def build(out: Path, layers: int, hidden: int) -> Path:
    import torch
    from transformers import Phi3ForCausalLM

    from aegis import tiny

    src = tiny.ensure(log=lambda m: print(m, file=sys.stderr))
    heads = hidden // 96  # head_dim 96, as Phi-3.5's
    arch = PHI35 | tiny.shape(hidden, hidden * PHI35["intermediate_size"] // PHI35["hidden_size"], layers, heads, heads)
    config = tiny.phi3_config(arch)
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
