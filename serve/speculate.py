"""Prompt lookup: a greedy request's next tokens guessed from its own prompt and reply, with no second model.

A reply that quotes, summarises or edits its input repeats runs of the input's tokens. When the latest few tokens
(an n-gram of NGRAMS' sizes, longest first) occurred before, the tokens that followed that last occurrence are the
draft. The batch decodes the draft with the request's next token in one step and keeps the longest start of it that
greedy decoding agrees with (serve/batch.py), so the reply is the one plain decoding gives, in fewer steps.
"""

from __future__ import annotations

NGRAMS = (3, 2)  # n-gram sizes looked up, longest first; a single token matches too often to guess well


class Drafter:
    """The tokens of one request (prompt, then what it generated) and where each of their n-grams ended last."""

    def __init__(self, tokens: list[int]):
        self.tokens: list[int] = []
        self.seen: dict[tuple[int, ...], int] = {}  # n-gram -> the index just past its latest earlier occurrence
        self.indexed = 0  # n-grams ending before this index are in `seen`
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def _index(self) -> None:
        """Every n-gram that ends before the last token (the latest one must not find itself)."""
        toks, end = self.tokens, len(self.tokens) - 1
        for i in range(self.indexed, end):
            for n in NGRAMS:
                if i + 1 >= n:
                    self.seen[tuple(toks[i + 1 - n:i + 1])] = i + 1
        self.indexed = max(self.indexed, end)

    def draft(self, most: int) -> list[int]:
        """Up to `most` tokens that followed the latest earlier occurrence of the longest n-gram the tokens end with
        ([] when none occurred before)."""
        if most <= 0:
            return []
        self._index()
        toks = self.tokens
        for n in NGRAMS:
            if len(toks) > n:
                end = self.seen.get(tuple(toks[-n:]))
                if end is not None:
                    return toks[end:end + most]
        return []
