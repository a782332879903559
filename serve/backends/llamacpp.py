"""llama.cpp through llama-cpp-python, on a GGUF file (CPU here; GPU where llama-cpp-python is built with CUDA).

The vocabulary is a vocab-only load of the same file (no weights, no context), so tokenizing on request threads never
touches the decoding context. Decoding is one batched context for all requests (llamacpp_batch.LlamaBatch).
"""

from __future__ import annotations

import codecs
import logging
import os
from pathlib import Path

from aegis import gguf_context, llamacpp

from .base import Backend, Control, Detokenizer, end_of_turn_ids
from .guides import GrammarError, Guides
from .llamacpp_batch import LlamaBatch

log = logging.getLogger(__name__)


class LlamaDetokenizer(Detokenizer):
    def __init__(self, piece):
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._piece(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class LlamaCppBackend(Backend):
    kind = "llama.cpp"
    supports_grammar = True
    batched = True

    def __init__(self, path: Path, n_ctx: int = 0, n_threads: int = 0, n_batch: int = 512, gpu_layers: int = -1):
        llama_cpp = llamacpp.runtime()

        self.path = Path(path)
        self._vocab_llm = llamacpp.open_vocab(self.path)
        llamacpp.quiet()  # llama.cpp's loader chatter is no use in the server's log
        model = self._vocab_llm._model
        self._vocab = model.vocab
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(self._vocab)
        # the one rule (aegis.gguf_context.Context): the model's context, a LongRoPE model's original one, at most 4096;
        # export's parity records its greedy replies in the same context
        rule = gguf_context.context(self.path)
        self.context_length = n_ctx or rule.default
        self.n_ctx_train = rule.length or self.context_length
        if n_ctx and (why := rule.warning(n_ctx)):
            log.warning(
                "%s: --ctx-size %d: %s; the default (--ctx-size 0) serves %d", self.path.name, n_ctx, why, rule.default
            )
        # half the cores, as llama-cpp-python's own server does: on shared or busy cores more threads than free
        # cores make llama.cpp's thread barriers spin and slow everything down
        self.n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        self.n_batch, self.gpu_layers = n_batch, gpu_layers
        # Before any request: a child process loads the file and decodes, so a crash in llama.cpp is a start-up
        # error that says what failed (and which loader settings are safe), not the death of the first request.
        self.loader = llamacpp.probe(self.path, threads=self.n_threads)
        raw = llama_cpp.llama_model_chat_template(model.model, None)
        self.chat_template = raw.decode("utf-8") if raw else None
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.bos_id = bos if 0 <= bos < self.vocab_size else None
        self.special_tokens = {}
        for name, tid in (("bos_token", bos), ("eos_token", llama_cpp.llama_vocab_eos(self._vocab))):
            if 0 <= tid < self.vocab_size:
                self.special_tokens[name] = self._text(tid)
        self.controls = {}
        for tid in range(self.vocab_size):
            attr = llama_cpp.llama_vocab_get_attr(self._vocab, tid)
            # the tokens llama.cpp reads from text only when asked to parse special tokens
            if attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN) and self._text(tid):
                self.controls[self._text(tid)] = Control(
                    tid, bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP), bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP)
                )
        self.controls_not_eog = sorted(
            c.id for c in self.controls.values() if not llama_cpp.llama_vocab_is_eog(self._vocab, c.id)
        )
        stops = end_of_turn_ids(self._lookup)
        stops |= set(eog := [t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self._vocab, t)])
        self.stop_ids = frozenset(stops)
        # under a grammar, the end of generation is llama.cpp's own (the GGUF's EOG tokens), where the grammar may
        # end; the other stops (a turn marker such as <|user|>) are control tokens, never grammar text
        self.guides = Guides(self._vocab, self.vocab_size, eog, self.controls_not_eog)
        self._pieces: dict[int, bytes] = {}

    def _text(self, tid: int) -> str:
        llama_cpp = llamacpp.runtime()
        return llama_cpp.llama_vocab_get_text(self._vocab, tid).decode("utf-8", errors="replace")

    def _lookup(self, text: str) -> int | None:
        ids = self.tokenize(text, add_special=False, parse_special=True)
        return ids[0] if len(ids) == 1 and self._text(ids[0]) == text else None

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self._vocab_llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def tokenize_text(self, text: str) -> list[int]:
        # llama.cpp tokenizes each stretch of text between control tokens on its own, as this does
        return self._vocab_llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def compile_grammar(self, grammar: str) -> object | None:
        """The GBNF's llguidance matcher, made on the request thread (the decoding thread only copies it)."""
        try:
            return self.guides.compile(grammar)
        except GrammarError as e:
            log.info("grammar refused: %s", e)
            return None

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (b"" for control tokens), cached: the vocabulary never changes."""
        got = self._pieces.get(token)
        if got is None:
            got = self._pieces[token] = llamacpp.piece(self._vocab, token)
        return got

    def detokenizer(self) -> Detokenizer:
        return LlamaDetokenizer(self.token_bytes)

    def new_batch(self, slots: int, cache_type: str = "f16") -> LlamaBatch:
        return LlamaBatch(self, slots, cache_type)

    def close(self) -> None:
        self._vocab_llm.close()
