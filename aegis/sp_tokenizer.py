"""The embedded model's tokenizer: SentencePiece BPE trained on the corpus, dressed as Phi-3's (aegis/tiny.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

# SentencePiece's trainer options, whatever the corpus: BPE with byte fallback over the text as written, <unk> <s>
# </s> at Phi-3's ids 0 1 2 and no padding piece, every sentence read in order on one thread
TRAINER_OPTIONS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "character_coverage": 0.9995,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "num_threads": 1,
    "minloglevel": 2,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
}


def train(
    texts: list[str], workdir: Path, vocab_size: int, special_tokens: list[str], chat_template: str, max_length: int
):
    """A SentencePiece BPE tokenizer with byte fallback trained on `texts` (workdir/sp.model), as a transformers
    tokenizer with Phi-3's special tokens and chat template."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    source = workdir / "sp_input.txt"
    source.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(source), model_prefix=str(workdir / "sp"), vocab_size=vocab_size, **TRAINER_OPTIONS
    )
    tok_dir = workdir / "tok"
    tok_dir.mkdir()
    shutil.copy(workdir / "sp.model", tok_dir / "tokenizer.model")
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": False,
                "add_eos_token": False,
                "legacy": False,
            }
        )
    )
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in special_tokens
            ]
        }
    )
    # Phi-3's conventions: generation ends at <|endoftext|>, which is also the padding token.
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    tok.chat_template = chat_template
    tok.model_max_length = max_length
    return tok


def vocab_digest(sp_model: Path) -> str:
    """The SentencePiece vocabulary (pieces, scores, types), not the file: the file also records where it was
    trained (temporary paths), so two identical vocabularies never have identical bytes."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    rows = (
        f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\t{sp.is_byte(i)}{sp.is_control(i)}{sp.is_unknown(i)}"
        for i in range(sp.get_piece_size())
    )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]
