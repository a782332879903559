"""The embedded tiny Phi-3: a real (if small) Japanese language model built from the corpus that ships with AEGIS.

It has Phi-3's real structure (fused qkv_proj / gate_up_proj, LongRoPE with short and long factors, an untied head),
a SentencePiece BPE tokenizer with byte fallback trained on the corpus plus Phi-3's special tokens and chat template,
and it is pre-trained on the corpus's train split, the chats weighted up so that it learns to answer in turns. A
build is cached by a fingerprint of the corpus and this recipe, never downloaded.

Pre-training (800 steps of 32 x 256 tokens) takes under a minute on one GPU but, by estimate, an hour on 2 CPU
cores, so the weights of one build ship with the package (aegis/corpus/tiny_weights.safetensors, 16-bit, 14 MB)
under the fingerprint and the tokenizer vocabulary they were trained for: a build whose fingerprint and vocabulary
match them takes them and skips pre-training; any change to the corpus or the recipe makes the builder pre-train
from source again (and tests/test_tiny_weights.py fails until the weights are shipped anew).

    python -m aegis.tiny                  build (or find) the cached copy and print its path
    python -m aegis.tiny --out DIR        build into DIR
    python -m aegis.tiny --out DIR --from-source --ship
                                          pre-train from source (on a GPU if there is one) and ship the weights
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

from . import sp_tokenizer

# 3: chats weighted up, trained to fit the corpus; the config states LongRoPE's factor (transformers 5 warns on every
# load without it)
RECIPE_VERSION = 3
SP_VOCAB = 4000
SEQ_LEN, BATCH, STEPS, LR, WARMUP = 256, 32, 800, 1e-3, 30
EVAL_EVERY, DROPOUT = 50, 0.1
# The chats are a third of the corpus's tokens; seen CHAT_WEIGHT times as often as the prose, they teach the model
# to answer a user turn and to close it with <|end|>.
CHAT_WEIGHT = 3
ARCH = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=8, original_max_position_embeddings=512, max_position_embeddings=2048,
            rms_norm_eps=1e-5, rope_theta=10000.0)
# Phi-3's added tokens in Phi-3's order; they follow the SentencePiece vocabulary as in the real model (32000...).
SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
                  "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
CORPUS_PROSE = ["prose_train_a.txt", "prose_train_b.txt", "prose_train_c.txt"]
CORPUS_CHAT = ["chat_train.jsonl"]
CORPUS_TRAIN = CORPUS_PROSE + CORPUS_CHAT
# Held-out prose is scored in the build's log; the held-out chats are never seen by the build (train.chat_quality).
CORPUS_HELD = ["prose_eval.txt"]
CORPUS_EVAL = ["prose_eval.txt", "chat_eval.jsonl"]
SHIPPED = "tiny_weights.safetensors"


def corpus_path(name: str) -> Path:
    """A file of the corpus that ships inside the package."""
    return Path(str(resources.files("aegis") / "corpus" / name))


def paragraphs(path: Path) -> list[str]:
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def _texts(names: list[str], render) -> list[str]:
    """Prose paragraphs and chats rendered with the chat template (render: messages -> str)."""
    out = []
    for name in names:
        path = corpus_path(name)
        if name.endswith(".jsonl"):
            out += [render(json.loads(line)["messages"]) for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
        else:
            out += paragraphs(path)
    return out


def fingerprint() -> str:
    h = hashlib.sha256(json.dumps([RECIPE_VERSION, SP_VOCAB, SEQ_LEN, BATCH, STEPS, LR, WARMUP, EVAL_EVERY, DROPOUT,
                                   CHAT_WEIGHT, ARCH]).encode())
    for name in sorted(CORPUS_TRAIN + CORPUS_EVAL):
        h.update(corpus_path(name).read_bytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("AEGIS_CACHE", Path.home() / ".cache" / "aegis"))


def _rope_factors(n: int) -> tuple[list[float], list[float]]:
    # Shaped like Phi-3.5's: short factors near 1, long factors rising with the frequency index.
    short = [round(1.0 + 0.05 * i / (n - 1), 4) for i in range(n)]
    long = [round(1.0 + 3.0 * (i / (n - 1)) ** 2, 4) for i in range(n)]
    return short, long


def _shipped(vocab: str, log) -> tuple[dict, dict] | None:
    """(state dict, stats) of the shipped weights when they were trained for this fingerprint and vocabulary."""
    from safetensors import safe_open

    path = corpus_path(SHIPPED)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint() or meta.get("vocab") != vocab:
            log(f"{path.name} was trained for fingerprint {meta.get('fingerprint')} / vocabulary {meta.get('vocab')}, "
                f"this build is {fingerprint()} / {vocab}: pre-training from source")
            return None
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    return state, json.loads(meta["stats"])


def ship(model_dir: Path) -> Path:
    """Write a built model's weights (16-bit) into the package as the shipped weights of this fingerprint."""
    from safetensors.torch import load_file, save_file

    model_dir = Path(model_dir)
    info = json.loads((model_dir / "aegis_tiny.json").read_text())
    if info["fingerprint"] != fingerprint():
        raise ValueError(f"{model_dir} was built for fingerprint {info['fingerprint']}, the recipe is {fingerprint()}")
    state = {k: v.half().contiguous() for k, v in load_file(model_dir / "model.safetensors").items()}
    stats = {k: v for k, v in info.items() if k not in ("fingerprint", "vocab", "shipped")}
    dest = corpus_path(SHIPPED)
    tmp = dest.with_name("." + dest.name + ".tmp")
    save_file(state, str(tmp), metadata={"fingerprint": info["fingerprint"], "vocab": info["vocab"],
                                         "stats": json.dumps(stats)})
    os.replace(tmp, dest)
    return dest


def _pretrain(model, ids: list[int], held_ids: list[int], log) -> dict:
    """AdamW on windows cut at random offsets, cosine schedule; the final weights are kept. Held-out prose is
    scored along the way for the log: it bottoms out early and then rises while the model learns its small
    corpus nearly by heart, which is what lets it close a reply with <|end|> instead of looping (README)."""
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

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    model.train()
    start = time.time()
    recent: list[float] = []
    for step in range(1, STEPS + 1):
        lr = LR * min(1.0, step / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        for group in opt.param_groups:
            group["lr"] = lr
        # windows at random offsets: every epoch cuts the texts differently
        starts = torch.randint(len(stream) - SEQ_LEN, (BATCH,), generator=g).tolist()
        batch = torch.stack([stream[s:s + SEQ_LEN] for s in starts]).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-EVAL_EVERY:]
        if step % EVAL_EVERY == 0 or step == STEPS:
            log(f"  pretrain step {step}/{STEPS} loss {sum(recent) / len(recent):.3f} held-out {held_loss():.3f} "
                f"({time.time() - start:.0f}s)")
    final = held_loss()
    model.to("cpu").eval()
    return {"train_loss": sum(recent) / len(recent), "heldout_loss": final, "steps": STEPS,
            "seconds": round(time.time() - start, 1), "device": device.type}


def build(out: Path, log=print, from_source: bool = False) -> Path:
    """Build the tiny model into `out` (written under a temporary name, then renamed). The shipped weights are
    used when they match this recipe and tokenizer, unless `from_source`."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    out = Path(out)
    torch.manual_seed(0)
    random.seed(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        log("building the embedded tiny Phi-3: tokenizer")
        plain = lambda msgs: "\n".join(m["content"] for m in msgs)  # noqa: E731 - text only, for the tokenizer
        tok = sp_tokenizer.train(_texts(CORPUS_TRAIN, plain), work, SP_VOCAB, SPECIAL_TOKENS, CHAT_TEMPLATE,
                                 ARCH["max_position_embeddings"])
        vocab = sp_tokenizer.vocab_digest(work / "sp.model")
        head_dim = ARCH["hidden_size"] // ARCH["num_attention_heads"]
        short, long = _rope_factors(head_dim // 2)
        config = Phi3Config(
            vocab_size=64 * math.ceil(len(tok) / 64), **{k: v for k, v in ARCH.items() if k != "rope_theta"},
            rope_parameters={"rope_type": "longrope", "short_factor": short, "long_factor": long,
                             "rope_theta": ARCH["rope_theta"], "factor": ARCH["max_position_embeddings"]
                             / ARCH["original_max_position_embeddings"]},
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False, sliding_window=None, attention_dropout=0.0, resid_pdrop=DROPOUT,
            embd_pdrop=DROPOUT)
        model = Phi3ForCausalLM(config)
        shipped = None if from_source else _shipped(vocab, log)
        if shipped:
            model.load_state_dict(shipped[0])
            stats = {**shipped[1], "shipped": True}
            log(f"using the shipped weights ({SHIPPED}) of this recipe")
        else:
            render = lambda msgs: tok.apply_chat_template(msgs, tokenize=False)  # noqa: E731
            encode = lambda texts: [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]
                                    + [tok.eos_token_id]]  # noqa: E731
            texts = _texts(CORPUS_PROSE, render) + _texts(CORPUS_CHAT, render) * CHAT_WEIGHT
            random.Random(0).shuffle(texts)
            ids, held_ids = encode(texts), encode(_texts(CORPUS_HELD, render))
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            log(f"pre-training {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters on "
                f"{len(ids)} tokens for {STEPS} steps of {BATCH} x {SEQ_LEN} ({device.type})")
            stats = _pretrain(model.to(device), ids, held_ids, log)
        stats["ln_vocab"] = math.log(config.vocab_size)
        model.eval()
        model.config.resid_pdrop = model.config.embd_pdrop = 0.0  # dropout was for pre-training only
        model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in
                                                ("<|end|>", "<|endoftext|>", "<|assistant|>")]
        model.generation_config.pad_token_id = tok.pad_token_id
        final = work / "model"
        model.save_pretrained(final)
        tok.save_pretrained(final)
        shutil.copy(work / "sp.model", final / "tokenizer.model")  # as on the hub: GGUF export reads scores here
        (final / "aegis_tiny.json").write_text(json.dumps({"fingerprint": fingerprint(), "vocab": vocab, **stats},
                                                          indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
        log(f"tiny model ready at {out}: held-out loss {stats['heldout_loss']:.2f} (ln vocab "
            f"{stats['ln_vocab']:.2f})" + ("" if shipped else f" in {stats['seconds']:.0f}s"))
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure(log=print) -> Path:
    """The cached tiny model, built on first use (one builder at a time; the others wait and reuse it)."""
    import fcntl

    path = cache_root() / f"tiny-{fingerprint()}"
    if (path / "aegis_tiny.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "aegis_tiny.json").exists():
            return path
        return build(path, log=log)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m aegis.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="build into this directory (default: the cache)")
    ap.add_argument("--from-source", action="store_true", help="pre-train even where shipped weights match")
    ap.add_argument("--ship", action="store_true", help=f"then write the weights into the package as {SHIPPED}")
    args = ap.parse_args(argv)
    if (args.from_source or args.ship) and not args.out:
        ap.error("--from-source and --ship need --out")
    path = build(args.out, from_source=args.from_source) if args.out else ensure()
    if args.ship:
        print(f"shipped {ship(path)}")
    print(path)


if __name__ == "__main__":
    main()
