"""Grammar-constrained decoding through llguidance: a request's GBNF (serve.structured's or serve.tools') compiled once
into a matcher, and, every step, the token masks of all constrained slots computed at once on llguidance's own
threads (the GIL let go) for the batched sampler to apply to their logits.

A mask comes from the grammar's state, not from trying tokens one by one, so a constrained slot costs a step tens of
microseconds whatever the model would have chosen; llama.cpp's grammar sampler walks the whole vocabulary each time
its first choice is refused, which a model that does not yet follow the schema makes the common case.

The vocabulary is read from the GGUF (llguidance.llamacpp): control tokens cannot stand for text, so a grammar never
lets "<|user|>" into a JSON string (the backend's banned tokens, control and unknown ones, are masked besides), and
the model's end-of-generation tokens are allowed exactly where the grammar may end. Compiled grammars are kept by
their text (apps send the same schema again and again); each request gets its own copy."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .gbnf_lark import GbnfError, to_lark

KEPT = 64  # compiled grammars kept for reuse


class GrammarError(ValueError):
    """llguidance refused the grammar (or a limit stopped it); the message says why."""


class Guides:
    """One vocabulary's grammar compiler and mask maker. compile() may run on any thread; masks() on the decoding
    thread alone."""

    def __init__(self, vocab, n_vocab: int, eog: list[int], banned: list[int] = ()):
        self.n_vocab = n_vocab
        self._vocab, self._eog = vocab, sorted(eog)
        self._banned = np.array(sorted(banned), np.int64)  # never allowed: control and unknown tokens
        self._banned_set = frozenset(banned)
        self._lock = threading.Lock()
        self._tokenizer = None  # built on first use: reading the vocabulary takes about a second
        self._executor = None
        self._kept: OrderedDict[str, object] = OrderedDict()
        self._bits = np.zeros((0, (n_vocab + 31) // 32), np.int32)

    def _ready(self):
        import llguidance
        import llguidance.llamacpp

        if self._tokenizer is None:
            self._tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(
                self._vocab, n_vocab=self.n_vocab, eos_token=self._eog
            )
            self._executor = llguidance.LLExecutor()
        return llguidance

    def compile(self, gbnf: str):
        """A fresh matcher for the grammar (GrammarError where llguidance refuses it)."""
        with self._lock:
            llguidance = self._ready()
            pristine = self._kept.get(gbnf)
            if pristine is not None:
                self._kept.move_to_end(gbnf)
                return pristine.deep_copy()
        try:
            lark = to_lark(gbnf)
        except GbnfError as e:
            raise GrammarError(f"the grammar could not be read: {e}") from None
        matcher = llguidance.LLMatcher(self._tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        with self._lock:
            self._kept[gbnf] = matcher
            while len(self._kept) > KEPT:
                self._kept.popitem(last=False)
        return matcher.deep_copy()

    def banned(self, token: int) -> bool:
        return token in self._banned_set

    def masks(self, matchers: list) -> np.ndarray:
        """The tokens each matcher allows next, one row of n_vocab booleans per matcher, computed in parallel."""
        from llguidance.numpy import fill_next_token_bitmask_par

        k = len(matchers)
        if len(self._bits) < k:
            self._bits = np.zeros((k, self._bits.shape[1]), np.int32)
        bits = self._bits[:k]
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bits)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, : self.n_vocab].view(bool)
        allowed[:, self._banned] = False
        return allowed
