"""The embedded tiny Phi-3: a real (if small) Japanese language model that ships with AEGIS, for offline runs and
tests.

It has Phi-3's real structure (fused qkv_proj / gate_up_proj, LongRoPE with short and long factors, an untied head)
and a SentencePiece BPE tokenizer with byte fallback, trained here on the corpus in aegis/corpus/, plus Phi-3's
special tokens and chat template. Its weights ship with the package (aegis/corpus/tiny_weights.safetensors, 16-bit)
under the vocabulary of the tokenizer they were trained with; a build trains the tokenizer, checks that vocabulary
and loads the weights, and is cached under the fingerprint the weights were made for. Making the weights anew (the
pre-training recipe) is no part of the package: tools/tiny_pretrain.py, from a checkout of the repository.

    python -m aegis.tiny                  build (or find) the cached copy and print its path
    python -m aegis.tiny --out DIR        build into DIR
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import cli, sp_tokenizer
from .atomic import atomic_dir
from .cli import setting
from .errors import ModelError
from .families.phi3 import CHAT_TEMPLATE  # the tiny model is a Phi-3: its family's chat format


def shape(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **more) -> dict:
    """The keywords that size a decoder's config (Phi-3, Llama, Mistral and Qwen2 name them alike), then `more`."""
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
    } | more


SP_VOCAB = 4000
# A dict, in this key order: the recipe's fingerprint (tools/tiny_pretrain.py) holds it as JSON.
ARCH = shape(256, 768, 6, 8, 8, original_max_position_embeddings=512, max_position_embeddings=2048)
ARCH |= {"rms_norm_eps": 1e-5, "rope_theta": 10000.0}
# Phi-3's added tokens in Phi-3's order; they follow the SentencePiece vocabulary as in the real model (32000...).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]
CORPUS_PROSE = ["prose_train_a.txt", "prose_train_b.txt", "prose_train_c.txt"]
CORPUS_CHAT = ["chat_train.jsonl"]
CORPUS_TRAIN = CORPUS_PROSE + CORPUS_CHAT
# Held-out prose is scored while pre-training; the held-out chats are never trained on (train.chat_quality).
CORPUS_HELD = ["prose_eval.txt"]
CORPUS_EVAL = ["prose_eval.txt", "chat_eval.jsonl"]
SHIPPED = "tiny_weights.safetensors"
INFO = "aegis_tiny.json"  # in a build: the fingerprint and vocabulary of its weights, and how they were made


def corpus_path(name: str) -> Path:
    """A file of the corpus that ships inside the package."""
    return Path(str(resources.files("aegis") / "corpus" / name))


def paragraphs(path: Path) -> list[str]:
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def texts(names: list[str], render) -> list[str]:
    """Prose paragraphs and chats rendered with the chat template (render: messages -> str)."""
    out = []
    for name in names:
        path = corpus_path(name)
        if name.endswith(".jsonl"):
            out += [
                render(json.loads(line)["messages"])
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
        else:
            out += paragraphs(path)
    return out


def shipped_metadata() -> dict:
    """The shipped weights' metadata: `fingerprint` (of the corpus and the recipe they were pre-trained with),
    `vocab` (the digest of their tokenizer's vocabulary) and `stats` (JSON: how the pre-training went)."""
    from safetensors import safe_open

    path = corpus_path(SHIPPED)
    if not path.is_file():
        raise ModelError(f"{path}: missing; the embedded model cannot be built without its weights")
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def fingerprint() -> str:
    """What names a build: the fingerprint the shipped weights were made for."""
    return shipped_metadata()["fingerprint"]


def cache_root() -> Path:
    return Path(os.environ.get("AEGIS_CACHE", Path.home() / ".cache" / "aegis"))


def _rope_factors(n: int) -> tuple[list[float], list[float]]:
    # Shaped like Phi-3.5's: short factors near 1, long factors rising with the frequency index.
    short = [round(1.0 + 0.05 * i / (n - 1), 4) for i in range(n)]
    long = [round(1.0 + 3.0 * (i / (n - 1)) ** 2, 4) for i in range(n)]
    return short, long


def tokenizer(work: Path):
    """The tokenizer trained on the corpus's training text in `work` (work/sp.model); (tokenizer, vocabulary
    digest)."""
    plain = lambda msgs: "\n".join(m["content"] for m in msgs)  # noqa: E731 - text only, for the tokenizer
    tok = sp_tokenizer.train(
        texts(CORPUS_TRAIN, plain), work, SP_VOCAB, SPECIAL_TOKENS, CHAT_TEMPLATE, ARCH["max_position_embeddings"]
    )
    return tok, sp_tokenizer.vocab_digest(work / "sp.model")


def phi3_config(arch: dict, factors=None, **more):
    """A Phi-3 config of `arch` (a shape() with max_position_embeddings and original_max_position_embeddings, and
    rope_theta unless the default) under LongRoPE, as Phi-3.5: an untied head, no sliding window. factors(head_dim
    // 2) gives the short and long rope factors (Phi-3.5-like ones by default); `more` adds or overrides keywords."""
    from transformers import Phi3Config

    short, long = (factors or _rope_factors)(arch["hidden_size"] // arch["num_attention_heads"] // 2)
    rope = {
        "rope_type": "longrope",
        "short_factor": short,
        "long_factor": long,
        "rope_theta": arch.get("rope_theta", 10000.0),
        "factor": arch["max_position_embeddings"] / arch["original_max_position_embeddings"],
    }
    sizes = {k: v for k, v in arch.items() if k != "rope_theta"}
    return Phi3Config(**sizes | {"rope_parameters": rope, "tie_word_embeddings": False, "sliding_window": None} | more)


def model_config(tok, dropout: float = 0.0):
    """The Phi-3 configuration for tokenizer `tok` (dropout only while pre-training)."""
    return phi3_config(
        ARCH,
        vocab_size=64 * math.ceil(len(tok) / 64),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_dropout=0.0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
    )


def shipped_weights(vocab: str) -> tuple[dict, dict]:
    """(state dict, stats) of the shipped weights; ModelError unless they were trained with vocabulary `vocab`."""
    from safetensors import safe_open

    meta = shipped_metadata()
    path = corpus_path(SHIPPED)
    if meta.get("vocab") != vocab:
        raise ModelError(
            f"{path}: trained with tokenizer vocabulary {meta.get('vocab')}, the tokenizer built from "
            f"the corpus is {vocab}; make the weights anew (tools/tiny_pretrain.py --ship)"
        )
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 - a safetensors file, not a dict
    return state, json.loads(meta["stats"])


def save(model, tok, work: Path, out: Path, info: dict, log=print) -> Path:
    """Writes a built model whole at `out` as a transformers directory (plus tokenizer.model and INFO)."""
    model.eval()
    model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    model.generation_config.eos_token_id = [
        tok.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>", "<|assistant|>")
    ]
    model.generation_config.pad_token_id = tok.pad_token_id
    info = {**info, "ln_vocab": math.log(model.config.vocab_size)}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.copy(work / "sp.model", tmp / "tokenizer.model")  # as on the hub: GGUF export reads scores here
        (tmp / INFO).write_text(json.dumps(info, indent=1))
    log(f"tiny model ready at {out}: held-out loss {info['heldout_loss']:.2f} (ln vocab {info['ln_vocab']:.2f})")
    return out


def build(out: Path, log=print) -> Path:
    """Build the tiny model into `out` (written whole) from the tokenizer trained here and the shipped weights."""
    from transformers import Phi3ForCausalLM

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-", dir=out.parent) as work:
        log("building the embedded tiny Phi-3: tokenizer")
        tok, vocab = tokenizer(Path(work))
        state, stats = shipped_weights(vocab)
        model = Phi3ForCausalLM(model_config(tok))
        model.load_state_dict(state)
        log(f"using the shipped weights ({SHIPPED})")
        info = {"fingerprint": fingerprint(), "vocab": vocab, **stats, "shipped": True}
        return save(model, tok, Path(work), out, info, log)


def ensure(log=print) -> Path:
    """The cached tiny model, built on first use (one builder at a time; the others wait and reuse it)."""
    import fcntl

    path = cache_root() / f"tiny-{fingerprint()}"
    if (path / INFO).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / INFO).exists():
            return path
        return build(path, log=log)


@dataclass
class Args:
    """Build the embedded tiny Phi-3 (or find its cached copy) and print the directory of the model."""

    out: Path | None = setting(None, "build into this directory (default: the cache)", metavar="DIR")


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        args = cli.parse(Args, sys.argv[1:] if argv is None else argv, prog="python -m aegis.tiny")
        print(build(args.out) if args.out else ensure())

    return cli.main(body)


if __name__ == "__main__":
    sys.exit(main())
