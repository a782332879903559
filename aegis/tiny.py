"""The embedded tiny Phi-3: a real (if small) Japanese language model built from the corpus that ships with AEGIS.

It has Phi-3's real structure (fused qkv_proj / gate_up_proj, LongRoPE with short and long factors, an untied head),
a SentencePiece BPE tokenizer with byte fallback trained on the corpus plus Phi-3's special tokens and chat template,
and it is briefly pre-trained on the corpus's train split. Everything is deterministic, so a build is cached by a
fingerprint of the corpus and this recipe, never downloaded.

    python -m aegis.tiny --out DIR        build into DIR
    python -m aegis.tiny                  build (or find) the cached copy and print its path
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

RECIPE_VERSION = 3  # 3: the config states LongRoPE's factor (transformers 5 warns on every load without it)
SP_VOCAB = 4000
SEQ_LEN, BATCH, STEPS, LR = 256, 8, 300, 3e-3
EVAL_EVERY, DROPOUT = 25, 0.1  # keep the weights with the best held-out loss; the corpus is small
ARCH = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, original_max_position_embeddings=512, max_position_embeddings=2048,
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
CORPUS_TRAIN = ["prose_train_a.txt", "prose_train_b.txt", "prose_train_c.txt", "chat_train.jsonl"]
CORPUS_EVAL = ["prose_eval.txt", "chat_eval.jsonl"]


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
    h = hashlib.sha256(json.dumps([RECIPE_VERSION, SP_VOCAB, SEQ_LEN, BATCH, STEPS, LR, ARCH]).encode())
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


def _train_tokenizer(texts: list[str], workdir: Path):
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    source = workdir / "sp_input.txt"
    source.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(source), model_prefix=str(workdir / "sp"), vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, input_sentence_size=0,
        shuffle_input_sentence=False)
    tok_dir = workdir / "tok"
    tok_dir.mkdir()
    shutil.copy(workdir / "sp.model", tok_dir / "tokenizer.model")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False, "legacy": False}))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in SPECIAL_TOKENS]})
    # Phi-3's conventions: generation ends at <|endoftext|>, which is also the padding token.
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = ARCH["max_position_embeddings"]
    return tok


def _pretrain(model, ids: list[int], eval_ids: list[int], log) -> dict[str, float]:
    import torch

    def windows(stream: list[int]) -> torch.Tensor:
        n = len(stream) // SEQ_LEN
        return torch.tensor(stream[: n * SEQ_LEN]).view(n, SEQ_LEN)

    @torch.no_grad()
    def held_loss() -> float:
        model.eval()
        loss = sum(model(input_ids=w[None], labels=w[None]).loss.item() for w in held) / len(held)
        model.train()
        return loss

    train, held = windows(ids), windows(eval_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    model.train()
    start = time.time()
    best = (float("inf"), 0, None)
    for step in range(1, STEPS + 1):
        lr = LR * min(1.0, step / 30) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = train[torch.randint(len(train), (BATCH,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % EVAL_EVERY == 0:
            h = held_loss()
            if h < best[0]:
                best = (h, step, {k: v.clone() for k, v in model.state_dict().items()})
            log(f"  pretrain step {step}/{STEPS} loss {loss.item():.3f} held-out {h:.3f} "
                f"({time.time() - start:.0f}s)")
    model.load_state_dict(best[2])
    model.eval()
    return {"train_loss": loss.item(), "heldout_loss": best[0], "best_step": best[1],
            "seconds": time.time() - start}


def build(out: Path, log=print) -> Path:
    """Build the tiny model into `out` (written under a temporary name, then renamed)."""
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
        tok = _train_tokenizer(_texts(CORPUS_TRAIN, plain), work)
        render = lambda msgs: tok.apply_chat_template(msgs, tokenize=False)  # noqa: E731
        encode = lambda texts: [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]
                                + [tok.eos_token_id]]  # noqa: E731
        ids, eval_ids = encode(_texts(CORPUS_TRAIN, render)), encode(_texts(CORPUS_EVAL, render))
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
        log(f"pre-training {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters on "
            f"{len(ids)} tokens for {STEPS} steps")
        stats = _pretrain(model, ids, eval_ids, log)
        stats["ln_vocab"] = math.log(config.vocab_size)
        model.config.resid_pdrop = model.config.embd_pdrop = 0.0  # dropout was for pre-training only
        model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in
                                                ("<|end|>", "<|endoftext|>", "<|assistant|>")]
        model.generation_config.pad_token_id = tok.pad_token_id
        final = work / "model"
        model.save_pretrained(final)
        tok.save_pretrained(final)
        shutil.copy(work / "sp.model", final / "tokenizer.model")  # as on the hub: GGUF export reads scores here
        (final / "aegis_tiny.json").write_text(json.dumps({"fingerprint": fingerprint(), **stats}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
        log(f"tiny model ready at {out}: held-out loss {stats['heldout_loss']:.2f} (ln vocab "
            f"{stats['ln_vocab']:.2f}) in {stats['seconds']:.0f}s")
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
    args = ap.parse_args(argv)
    print(build(args.out) if args.out else ensure())


if __name__ == "__main__":
    main()
