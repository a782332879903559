"""Pre-training the embedded tiny Phi-3 from source, and shipping its weights into the package (an experiment's
recipe, not part of the product: the package only loads the weights it ships, aegis/tiny.py).

    python tools/tiny_pretrain.py --out DIR            pre-train into DIR (on a GPU if there is one)
    python tools/tiny_pretrain.py --out DIR --ship     then write its weights into aegis/corpus/SHIPPED

The recipe: AdamW on windows cut at random offsets of the corpus's training text (the chats seen CHAT_WEIGHT times
as often as the prose, so that the model learns to answer a turn and close it with <|end|>), a linear warm-up into
a cosine decay, dropout while training; the final weights are kept. The weights carry the fingerprint of the corpus
and this recipe; tests/test_tiny_weights.py fails when either changes and the weights were not shipped anew."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from aegis import tiny
from aegis.atomic import atomic_file

# 3: chats weighted up, trained to fit the corpus; the config states LongRoPE's factor
RECIPE_VERSION = 3
SEQ_LEN, BATCH, STEPS, LR, WARMUP = 256, 32, 800, 1e-3, 30
EVAL_EVERY, DROPOUT = 50, 0.1
CHAT_WEIGHT = 3


def fingerprint() -> str:
    """The corpus and this recipe, as the shipped weights record them."""
    h = hashlib.sha256(
        json.dumps(
            [
                RECIPE_VERSION,
                tiny.SP_VOCAB,
                SEQ_LEN,
                BATCH,
                STEPS,
                LR,
                WARMUP,
                EVAL_EVERY,
                DROPOUT,
                CHAT_WEIGHT,
                tiny.ARCH,
            ]
        ).encode()
    )
    for name in sorted(tiny.CORPUS_TRAIN + tiny.CORPUS_EVAL):
        h.update(tiny.corpus_path(name).read_bytes())
    return h.hexdigest()[:16]


def learning_rate(step: int) -> float:
    """LR at `step` (1-based): the linear warm-up times the cosine decay over all STEPS."""
    return LR * min(1.0, step / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / STEPS))


def token_streams(tok) -> tuple[list[int], list[int]]:
    """(training tokens, held-out prose tokens): texts rendered with the chat template, each closed with EOS."""
    render = lambda msgs: tok.apply_chat_template(msgs, tokenize=False)  # noqa: E731

    def encode(texts: list[str]) -> list[int]:
        return [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]

    texts = tiny.texts(tiny.CORPUS_PROSE, render) + tiny.texts(tiny.CORPUS_CHAT, render) * CHAT_WEIGHT
    random.Random(0).shuffle(texts)
    return encode(texts), encode(tiny.texts(tiny.CORPUS_HELD, render))


def pretrain(model, ids: list[int], held_ids: list[int], log) -> dict:
    """The updates; held-out prose is scored along the way for the log (it bottoms out early and then rises while
    the model learns its small corpus nearly by heart, which lets it close a reply with <|end|>)."""
    import torch

    device = next(model.parameters()).device
    stream = torch.tensor(ids)
    n = len(held_ids) // SEQ_LEN
    held = torch.tensor(held_ids[: n * SEQ_LEN]).view(n, SEQ_LEN).to(device)

    @torch.no_grad()
    def held_loss() -> float:
        model.eval()
        loss = model(input_ids=held, labels=held).loss.item()  # windows of equal length: the mean over tokens
        model.train()
        return loss

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95), fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    model.train()
    start, recent = time.time(), []
    for step in range(1, STEPS + 1):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step)
        starts = torch.randint(len(stream) - SEQ_LEN, (BATCH,), generator=g).tolist()  # every epoch cuts anew
        batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts]).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-EVAL_EVERY:]
        if step % EVAL_EVERY == 0 or step == STEPS:
            log(
                f"  pretrain step {step}/{STEPS} loss {sum(recent) / len(recent):.3f} held-out {held_loss():.3f} "
                f"({time.time() - start:.0f}s)"
            )
    final = held_loss()
    model.to("cpu").eval()
    return {
        "train_loss": sum(recent) / len(recent),
        "heldout_loss": final,
        "steps": STEPS,
        "seconds": round(time.time() - start, 1),
        "device": device.type,
    }


def build(out: Path, log=print) -> Path:
    """The tiny model pre-trained from source into `out` (the package's tokenizer and configuration)."""
    import torch
    from transformers import Phi3ForCausalLM

    out = Path(out)
    torch.manual_seed(0)
    random.seed(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-", dir=out.parent) as work:
        tok, vocab = tiny.tokenizer(Path(work))
        model = Phi3ForCausalLM(tiny.model_config(tok, dropout=DROPOUT))
        ids, held_ids = token_streams(tok)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log(
            f"pre-training {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters on {len(ids)} "
            f"tokens for {STEPS} steps of {BATCH} x {SEQ_LEN} ({device.type})"
        )
        stats = pretrain(model.to(device), ids, held_ids, log)
        return tiny.save(model, tok, Path(work), out, {"fingerprint": fingerprint(), "vocab": vocab, **stats}, log)


def ship(model_dir: Path) -> Path:
    """Writes a built model's weights (16-bit) into the package as its shipped weights, with their fingerprint,
    vocabulary and pre-training stats."""
    from safetensors.torch import load_file, save_file

    model_dir = Path(model_dir)
    info = json.loads((model_dir / tiny.INFO).read_text())
    if info["fingerprint"] != fingerprint():
        raise ValueError(f"{model_dir} was built for fingerprint {info['fingerprint']}, the recipe is {fingerprint()}")
    state = {k: v.half().contiguous() for k, v in load_file(model_dir / "model.safetensors").items()}
    stats = {k: v for k, v in info.items() if k not in ("fingerprint", "vocab", "shipped", "ln_vocab")}
    dest = tiny.corpus_path(tiny.SHIPPED)
    with atomic_file(dest) as tmp:
        save_file(
            state,
            str(tmp),
            metadata={"fingerprint": info["fingerprint"], "vocab": info["vocab"], "stats": json.dumps(stats)},
        )
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/tiny_pretrain.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="pre-train into this directory")
    ap.add_argument("--ship", action="store_true", help=f"then write the weights into the package as {tiny.SHIPPED}")
    args = ap.parse_args(argv)
    path = build(args.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.ship:
        print(f"shipped {ship(path)}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
