"""The tokenizer as GGUF metadata: tokens, scores, token types, special ids and the flags llama.cpp needs to
tokenize exactly as the Hugging Face tokenizer does.

Where the HF tokenizer's behaviour is not written down in one obvious field (whether it adds BOS, whether a text
segment after a special token gets SentencePiece's '▁' prefix, whether special tokens swallow the whitespace after
them) it is measured by tokenizing a probe, so the GGUF follows what the tokenizer does rather than what a config
file claims."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from aegis import families, llamacpp

from .files import ExportError

T = gguf.TokenType

# The end-of-turn token of each family's chat format (aegis/families/): the first the tokenizer has is the GGUF's eot.
EOT_TOKENS = tuple(dict.fromkeys(f.end_of_turn[0] for f in families.FAMILIES.values() if f.end_of_turn))
# Pre-tokenizers (how byte-level BPE splits text before merging) llama.cpp knows, the family's usual one first; the
# one written is the first under which llama.cpp tokenizes PRE_PROBES exactly as the HF tokenizer does.
BPE_PRE = {f.name: f.bpe_pre for f in families.FAMILIES.values() if f.bpe_pre}
PRE_CANDIDATES = (
    "llama-bpe",
    "qwen2",
    "smollm",
    "gpt-2",
    "default",
    "gpt-4o",
    "llama4",
    "stablelm2",
    "starcoder",
    "olmo",
    "deepseek-llm",
    "refact",
    "command-r",
    "dbrx",
    "smaug-bpe",
    "bloom",
    "superbpe",
)
PRE_PROBES = [
    "吾輩は猫である。名前はまだ無い。",
    "複数行の\n\n質問です。\n- one\n- two",
    "Numbers: 12345, 3.14159, 2026年12月1日",
    "  two leading spaces\n\n\n\tand a tab,  double  spaces ",
    "I'm sure you'll SEE it's 'quoted' -- ok?!",
    "def f(x):\n    return x**2  # code",
    "日本語と English が混ざった文章: 今日は good weather ですね。",
]


@dataclass
class Vocab:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    scores: list[float]
    types: list[int]
    special: gguf.SpecialVocab | None = None  # merges, special ids (bos/eos/eot/unk/pad), add_bos/eos, chat template
    pre: str | None = None
    add_space_prefix: bool | None = None  # SentencePiece only
    specials_rstrip: bool = False  # special tokens eat the whitespace after them (Phi-3's tokenizer does)
    tokenizer: object = field(default=None, repr=False)  # the HF tokenizer it was measured on
    notes: list[str] = field(default_factory=list)


def _added_tokens(model_dir: Path) -> list[dict]:
    """[{id, content, special}] from tokenizer.json, else tokenizer_config.json."""
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        return [
            {"id": int(t["id"]), "content": t["content"], "special": bool(t.get("special"))}
            for t in json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", [])
        ]
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        dec = json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        return [{"id": int(i), "content": t["content"], "special": bool(t.get("special"))} for i, t in dec.items()]
    return []


def _spm(model_dir: Path, n_vocab: int) -> Vocab:
    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    sp = SentencePieceProcessor(model_file=str(path))
    n_sp = sp.vocab_size()
    if n_sp > n_vocab:
        raise ExportError(f"{path}: {n_sp} pieces, more than the model's vocab_size {n_vocab} (config.json)")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [T.UNUSED] * n_vocab
    for i in range(n_sp):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (
            T.UNKNOWN
            if sp.is_unknown(i)
            else T.CONTROL
            if sp.is_control(i)
            else T.UNUSED
            if sp.is_unused(i)
            else T.BYTE
            if sp.is_byte(i)
            else T.NORMAL
        )
    for t in _added_tokens(model_dir):
        i = t["id"]
        if i >= n_vocab:
            raise ExportError(
                f"{model_dir / 'tokenizer.json'}: added token {t['content']!r} has id {i}, outside "
                f"vocab_size {n_vocab} (config.json)"
            )
        if i < n_sp and tokens[i] == t["content"]:
            continue  # <unk>, <s>, </s>: SentencePiece already typed them
        tokens[i], scores[i] = t["content"], -1000.0
        types[i] = T.CONTROL if t["special"] else T.USER_DEFINED
    return Vocab(model="llama", tokens=tokens, scores=scores, types=types)


def _bpe(model_dir: Path, n_vocab: int, model_type: str) -> Vocab:
    tj = model_dir / "tokenizer.json"
    data = json.loads(tj.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(
            f"{tj}: tokenizer model {model.get('type')!r} is not supported (SentencePiece with "
            f"tokenizer.model, or byte-level BPE)"
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [T.UNUSED] * n_vocab
    for piece, i in model["vocab"].items():
        tokens[i], types[i] = piece, T.NORMAL
    for t in _added_tokens(model_dir):
        tokens[t["id"]] = t["content"]
        types[t["id"]] = T.CONTROL if t["special"] else T.USER_DEFINED
    return Vocab(
        model="gpt2", tokens=tokens, scores=[0.0] * n_vocab, types=types, pre=BPE_PRE.get(model_type, "default")
    )


def _probe(tok, vocab: Vocab) -> None:
    """Measure the HF tokenizer's BOS/EOS, space-prefix and rstrip behaviour (see the module docstring)."""
    ids = tok("a")["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    vocab.special.add_special_token = {
        "bos": bos is not None and len(ids) > 0 and ids[0] == bos,
        "eos": eos is not None and len(ids) > 1 and ids[-1] == eos,
    }
    specials = [
        t
        for t in tok.all_special_tokens
        if t not in (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token, "<|endoftext|>")
    ]
    probe = next((t for t in EOT_TOKENS if t in specials), specials[0] if specials else None)
    space_probe = probe or tok.bos_token  # a chat template's text follows a turn marker, or BOS
    if vocab.model == "llama":
        if space_probe is not None:
            pieces = tok.convert_ids_to_tokens(tok(space_probe + "a", add_special_tokens=False)["input_ids"])
            vocab.add_space_prefix = len(pieces) > 1 and pieces[1].startswith("▁")
            first = tok.convert_ids_to_tokens(tok("a", add_special_tokens=False)["input_ids"])
            if first and first[0].startswith("▁") != vocab.add_space_prefix:
                vocab.notes.append(
                    f"the HF tokenizer puts '▁' before the first plain-text segment "
                    f"({'yes' if first[0].startswith('▁') else 'no'}) but "
                    f"{'also' if vocab.add_space_prefix else 'not'} after special tokens; llama.cpp does one "
                    f"or the other, so add_space_prefix={vocab.add_space_prefix} follows chat-templated text, and "
                    f"untemplated text must be tokenized by HF for exact parity"
                )
        else:
            first = tok.convert_ids_to_tokens(tok("a", add_special_tokens=False)["input_ids"])
            vocab.add_space_prefix = bool(first) and first[0].startswith("▁")
    if probe is not None:
        vocab.specials_rstrip = len(tok(probe + "\n", add_special_tokens=False)["input_ids"]) == 1


def choose_pre(vocab: Vocab, tok, write_probe, workdir: Path) -> None:
    """For byte-level BPE, set vocab.pre to the first of PRE_CANDIDATES under which llama.cpp tokenizes PRE_PROBES as
    `tok` does. `write_probe(path)` writes a GGUF of the vocabulary and metadata only (no tensors)."""
    want = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in PRE_PROBES]
    tried = []
    for pre in dict.fromkeys([vocab.pre, *PRE_CANDIDATES]):
        vocab.pre = pre
        path = Path(workdir) / f".tmp-pre-{pre}.gguf"
        try:
            write_probe(path)
            try:
                llm = llamacpp.open_vocab(path)
            except ValueError:  # a name this llama.cpp does not know
                continue
            got = [list(llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)) for t in PRE_PROBES]
            llm.close()
        finally:
            path.unlink(missing_ok=True)
        tried.append(pre)
        if got == want:
            return
    raise ExportError(
        f"the tokenizer splits text in a way none of llama.cpp's pre-tokenizers does (tried "
        f"{', '.join(tried)}): llama.cpp would tokenize differently from the HF tokenizer"
    )


def build(model_dir: Path, config: dict) -> Vocab:
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    n_vocab = int(config["vocab_size"])
    if (model_dir / "tokenizer.model").is_file():
        vocab = _spm(model_dir, n_vocab)
    elif (model_dir / "tokenizer.json").is_file():
        vocab = _bpe(model_dir, n_vocab, config.get("model_type", ""))
    else:
        raise ExportError(f"{model_dir}: no tokenizer.model (SentencePiece) or tokenizer.json")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if len(tok) > n_vocab:
        raise ExportError(f"{model_dir}: the tokenizer has {len(tok)} tokens, more than vocab_size {n_vocab}")
    for want, got in ((tok.convert_ids_to_tokens(i), vocab.tokens[i]) for i in range(len(tok))):
        if vocab.model == "llama" and want != got:
            raise ExportError(f"{model_dir}: token {got!r} in the GGUF vocabulary is {want!r} in the HF tokenizer")
    # gguf-py reads merges and special tokens from the files; the ids the HF tokenizer actually uses win.
    vocab.special = gguf.SpecialVocab(
        model_dir, load_merges=vocab.model == "gpt2", special_token_types=("bos", "eos", "unk", "pad"), n_vocab=n_vocab
    )
    for name, tid in (
        ("bos", tok.bos_token_id),
        ("eos", tok.eos_token_id),
        ("unk", tok.unk_token_id),
        ("pad", tok.pad_token_id),
    ):
        if tid is not None:
            vocab.special.special_token_ids[name] = int(tid)
    for t in EOT_TOKENS:
        tid = tok.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tok.unk_token_id and vocab.tokens[tid] == t:
            vocab.special.special_token_ids["eot"] = tid
            break
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    vocab.special.chat_template = template
    _probe(tok, vocab)
    vocab.tokenizer = tok
    return vocab


def write(writer, vocab: Vocab) -> None:
    """Add the vocabulary's keys to a gguf.GGUFWriter (llama.cpp's tokenizer reads these)."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    # add_bos/add_eos are always written (measured by _probe): llama.cpp's defaults for a SentencePiece vocabulary
    # (add BOS, add a space prefix) are not this tokenizer's.
    vocab.special.add_to_gguf(writer, quiet=True)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
