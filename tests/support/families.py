"""Small deterministic models of every family AEGIS supports, built by the tests as aegis/tiny.py builds the embedded
Phi-3: a tokenizer (byte-level BPE trained on the embedded corpus, or the embedded SentencePiece model) with the
family's special tokens and a chat template written after the family's own conventions, and seeded random weights of
the family's architecture, including tied embeddings and q/k/v biases where the family has them.

CHAT_FORMATS are the chat templates alone (for the Modelfile template proofs); a family's own comes from its file in
aegis/families/, with the tokenizer test data here. FAMILIES pair every registered family with its chat format and
config (for the end-to-end runs): a family is tested once it has an entry in both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from aegis import families as registry
from aegis.tiny import shape

# ---- chat templates, written after each family's conventions -------------------------------------------------------
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system is not none %}"
    "{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
MISTRAL_NO_SYSTEM = (  # v0.1's: user/assistant turns only
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (  # Gemma 3's: a system message opens the first user turn; turns are trimmed
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA_NO_SYSTEM = (  # Gemma 1/2's
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
ALPACA = (  # a format AEGIS does not write: the proof must refuse it
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] }}"
    "{% else %}{{ '### Response:\n' + message['content'] }}{% endif %}{{ '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


def _family(name: str, kind: str, specials: list[str], bos: str | None, eos: str | None, add_bos: bool) -> tuple:
    """A family's own chat format: its template and Ollama format from aegis/families/, a tokenizer of these specs."""
    family = registry.FAMILIES[name]
    return kind, specials, bos, eos, add_bos, family.chat_template, family.ollama_format


# name -> (tokenizer kind, special tokens, bos, eos, adds BOS, chat template, format the proof must find)
CHAT_FORMATS = {
    "phi3": _family("phi3", "tiny", [], None, None, False),
    "chatml": ("bpe", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", False, CHATML, "ChatML"),
    "chatml-default-system": _family(
        "qwen2", "bpe", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", False
    ),
    "llama3": _family(
        "llama",
        "bpe",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        True,
    ),
    "llama2": ("spm", [], "<s>", "</s>", True, LLAMA2, "Llama 2 [INST]"),
    "mistral": _family("mistral", "spm", [], "<s>", "</s>", True),
    "mistral-no-system": ("spm", [], "<s>", "</s>", True, MISTRAL_NO_SYSTEM, "Mistral [INST]"),
    "gemma": (
        "bpe",
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        True,
        GEMMA,
        "Gemma",
    ),
    "gemma-no-system": (
        "bpe",
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        True,
        GEMMA_NO_SYSTEM,
        "Gemma",
    ),
    "alpaca": ("bpe", ["<|endoftext|>"], None, "<|endoftext|>", False, ALPACA, None),
}

# architecture -> (chat format, config overrides): tied embeddings for Llama and Qwen2 (as SmolLM and Qwen2.5-0.5B),
# Qwen2's q/k/v biases come with the architecture.
FAMILIES = {
    "phi3": ("phi3", {"tie_word_embeddings": False}),
    "llama": ("llama3", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"tie_word_embeddings": False, "sliding_window": None}),
    "qwen2": ("chatml-default-system", {"tie_word_embeddings": True}),
}
PRETRAIN_STEPS = 30
# Extra training settings per family (none today: Mistral v0.3's template, which moves the system prompt into the
# last user turn, trains on the same chats, turn by turn: train/data.py).
TRAIN_OVERRIDES: dict[str, list[str]] = {}
# Rows of 256 so that llama.cpp's K-quants apply rather than fall back.
SHAPE = shape(256, 512, 2, 4, 2, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0)


def _bpe(texts: list[str], specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=1200, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return bpe


def build_tokenizer(fmt: str, out: Path, tiny_path: Path) -> Path:
    """A tokenizer directory for chat format `fmt` (see CHAT_FORMATS)."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from aegis.tiny import corpus_path

    kind, specials, bos, eos, add_bos, template, _ = CHAT_FORMATS[fmt]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "tiny":
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_path / name, out / name)
        tok = AutoTokenizer.from_pretrained(out)
    elif kind == "spm":  # the embedded SentencePiece model, as Llama 2 and Mistral ship theirs
        shutil.copy(tiny_path / "tokenizer.model", out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "bos_token": bos,
                    "eos_token": eos,
                    "unk_token": "<unk>",
                    "add_bos_token": add_bos,
                    "add_eos_token": False,
                    "legacy": True,
                }
            )
        )
        tok = AutoTokenizer.from_pretrained(out)
    else:
        texts = [corpus_path(n).read_text(encoding="utf-8") for n in ("prose_train_a.txt", "prose_train_b.txt")]
        bpe = _bpe(texts, specials)
        if add_bos:
            bpe.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
            )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token=bos,
            eos_token=eos,
            pad_token=specials[0] if specials[0] not in (bos, eos) else eos,
        )
    tok.chat_template = template
    tok.save_pretrained(out)
    return out


def _pretrain(model, tok, steps: int = PRETRAIN_STEPS) -> None:
    """A few steps of next-token training on the corpus: random weights give near-flat logits whose argmax any
    rounding flips, so a quantized GGUF's parity would measure noise; trained ones have real preferences."""
    import torch

    from aegis.tiny import corpus_path

    ids = tok(corpus_path("prose_train_a.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    rows = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rows[torch.randint(len(rows), (8,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_model(family: str, out: Path, tiny_path: Path, seed: int = 0, chat_format: str | None = None) -> Path:
    """A small model of `family` (a FAMILIES key) with seeded random weights, saved with its tokenizer at `out`;
    `chat_format` replaces the family's own."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fmt, overrides = FAMILIES[family]
    out = build_tokenizer(chat_format or fmt, out, tiny_path)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = AutoConfig.for_model(
        family,
        vocab_size=64 * -(-len(tok) // 64),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **SHAPE,
        **overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if family == "qwen2" and p.dim() == 1 and not torch.all(p == 1):
                p.normal_(0.0, 0.5)  # non-zero q/k/v biases, so that a lost bias shows
    _pretrain(model, tok)
    model.save_pretrained(out)
    return out
