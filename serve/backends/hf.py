"""transformers, on a merged HF directory or on a training checkpoint (base + LoRA adapter + soul), for GPU users who
serve before exporting. The model's weights are shared by every worker (forward passes are re-entrant under
inference_mode); each worker's KV cache lives only inside its own generate() call."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from aegis.loading import load_checkpoint
from aegis.pretrained import pretrained

from . import is_checkpoint, is_hf_model
from .base import Backend, Control, Detokenizer, Sampling, Session, end_of_turn_ids

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HFDetokenizer(Detokenizer):
    """Incremental decoding over a sliding window: decode the last few tokens with and without the new one and emit
    the difference, so a word's spacing and a multi-token character come out as the whole sequence decodes."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # U+FFFD: a character still incomplete
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.read = len(self.ids)
        return after[len(before) :]


def sample(logits, sampling: Sampling, counts: dict[int, int], generator):
    """One token id from last-position logits (float32, 1-D) with OpenAI's parameter semantics."""
    import torch

    if counts and (sampling.presence_penalty or sampling.frequency_penalty):
        ids = torch.tensor(list(counts), device=logits.device)
        n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.clone()
        logits[ids] -= sampling.frequency_penalty * n + sampling.presence_penalty
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        k = min(sampling.top_k, logits.numel())
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= sampling.top_p
        drop[0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


class HFSession(Session):
    def __init__(self, backend: HFBackend):
        self.backend = backend
        self._logits = None

    def logits(self) -> np.ndarray:
        return self._logits.numpy()

    def generate(self, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        import torch

        model, device, n_vocab = self.backend.model, self.backend.device, self.backend.vocab_size
        generator = torch.Generator(device="cpu")
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed % (2**63))
        else:
            generator.seed()
        counts: dict[int, int] = {}
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
            while True:
                logits = out.logits[0, -1].float().cpu()
                if logits.numel() > n_vocab:  # rows past the tokenizer (padding) are never sampled
                    logits[n_vocab:] = float("-inf")
                token = sample(logits, sampling, counts, generator)
                counts[token] = counts.get(token, 0) + 1
                self._logits = logits
                yield token
                cache = out["cache"] if "cache" in out else out["past_key_values"]
                out = model(
                    input_ids=torch.tensor([[token]], device=device),
                    **{self.backend.cache_arg: cache},
                    use_cache=True,
                    logits_to_keep=1,
                )


class HFBackend(Backend):
    kind = "transformers"

    def __init__(
        self, path: Path, n_ctx: int = 0, device: str = "auto", dtype: str = "auto", quantization: str | None = None
    ):
        import torch
        from transformers import AutoTokenizer

        self.path = Path(path)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if is_checkpoint(self.path):
            # base + adapter + soul, exactly as training left them (the soul stays a module in front of the head)
            self.model, _soul, self.tokenizer, _meta = load_checkpoint(
                self.path, quantization=quantization, dtype=dtype, device=self.device
            )
            self.kind = "transformers (checkpoint)"
        elif is_hf_model(self.path):
            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            self.model = pretrained(self.path, dtype=torch_dtype, device_map={"": self.device})
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        else:
            raise ValueError(
                f"{self.path}: neither a training checkpoint (soul.safetensors + adapter) nor a "
                f"model directory (config.json)"
            )
        self.model.eval()
        # transformers 5 renamed the KV-cache argument from past_key_values to cache
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        tok = self.tokenizer
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None) or tok.model_max_length
        self.context_length = min(n_ctx or limit, limit)
        self.vocab_size = len(tok)
        self.chat_template = tok.chat_template if isinstance(tok.chat_template, str) else None
        self.special_tokens = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
        self.add_bos = bool(getattr(tok, "add_bos_token", False)) and tok.bos_token_id is not None
        self.bos_id = tok.bos_token_id
        self.controls = {
            t.content: Control(i, bool(t.lstrip), bool(t.rstrip))
            for i, t in tok.added_tokens_decoder.items()
            if t.special and t.content
        }
        self._text_tokenizer, self._metaspace = text_tokenizer(tok)
        unk = tok.unk_token_id

        def lookup(text: str) -> int | None:
            tid = tok.convert_tokens_to_ids(text)
            return tid if isinstance(tid, int) and tid != unk and tid < self.vocab_size else None

        stops = end_of_turn_ids(lookup)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        stops |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            stops.add(tok.eos_token_id)
        self.stop_ids = frozenset(stops)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special, split_special_tokens=not parse_special)["input_ids"]

    def tokenize_text(self, text: str) -> list[int]:
        if self._text_tokenizer is None:
            return self.tokenize(text, add_special=False)
        return self._text_tokenizer.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token: int) -> bytes:
        if token in self.tokenizer.all_special_ids:
            return b""
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if m := BYTE_PIECE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return (
            piece.replace("\u2581", " ") if self._metaspace else self.tokenizer.convert_tokens_to_string([piece])
        ).encode("utf-8")

    def detokenizer(self) -> Detokenizer:
        return HFDetokenizer(self.tokenizer)

    def new_session(self) -> Session:
        return HFSession(self)


def text_tokenizer(tok):
    """(a copy of the fast tokenizer that reads control-token text as text and, for SentencePiece-style
    tokenizers, adds no word-start marker in front, or None; whether it is SentencePiece-style). A stretch of text
    inside a prompt must tokenize as it does inside the whole prompt, where only the very start gets the marker."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None, False
    from tokenizers import Tokenizer, pre_tokenizers

    copy = Tokenizer.from_str(backend.to_str())
    copy.encode_special_tokens = True
    pre = copy.pre_tokenizer
    metaspace = isinstance(pre, pre_tokenizers.Metaspace)
    if metaspace:
        pre.prepend_scheme = "never"
        copy.pre_tokenizer = pre
    return copy, metaspace
