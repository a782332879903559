"""Drafts for speculative decoding: a greedy request's next tokens guessed from its own prompt and reply (prompt
lookup, `Drafter`), or by a smaller model with the same vocabulary (`--draft-model`, `DraftModel`).

A reply that quotes, summarises or edits its input repeats runs of the input's tokens. When the latest few tokens
(an n-gram of NGRAMS' sizes, longest first) occurred before, the tokens that followed that last occurrence are the
draft. The batch decodes the draft with the request's next token in one step and keeps the longest start of it that
greedy decoding agrees with (serve/batch.py), so the reply is the one plain decoding gives, in fewer steps.
"""

from __future__ import annotations

from pathlib import Path

from aegis import llamacpp
from aegis.errors import ModelError

from .backends.base import Sampling
from .backends.llamacpp import LlamaCppBackend
from .backends.llamacpp_batch import common_prefix

NGRAMS = (3, 2)  # n-gram sizes looked up, longest first; a single token matches too often to guess well
REST = 8  # steps a request drafts nothing after a one-token draft was refused


class Drafter:
    """The tokens of one request (prompt, then what it generated), where each of their n-grams ended last, and how
    many tokens to draft next.

    A drafted token that greedy decoding refuses was decoded for nothing: on a GPU it costs little beside the step's
    weights, on a CPU nearly a token's work. So the length follows what was kept (the heuristic of transformers'
    assisted generation): two more after a draft kept whole, one fewer otherwise; and a request whose one-token draft
    is refused rests REST steps. Free chat then drafts little, a reply that copies its input drafts the most."""

    def __init__(self, tokens: list[int], most: int):
        self.tokens: list[int] = []
        self.seen: dict[tuple[int, ...], int] = {}  # n-gram -> the index just past its latest earlier occurrence
        self.indexed = 0  # n-grams ending before this index are in `seen`
        self.most = most  # --speculate: never more per step
        self.length = most  # tokens to draft next step
        self.rest = 0  # steps left without a draft
        self.extend(tokens)

    def want(self) -> int:
        """How many tokens to draft this step (0 while resting); called once a step."""
        if self.rest:
            self.rest -= 1
            return 0
        return self.length

    def kept(self, drafted: int, accepted: int) -> None:
        """What greedy decoding kept of this step's draft sets the next one's length."""
        if not drafted:
            return
        if accepted == drafted:
            self.length = min(self.most, self.length + 2)
        elif accepted == 0 and self.length == 1:
            self.rest = REST
        else:
            self.length = max(1, self.length - 1)

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def _index(self) -> None:
        """Every n-gram that ends before the last token (the latest one must not find itself)."""
        toks, end = self.tokens, len(self.tokens) - 1
        for i in range(self.indexed, end):
            for n in NGRAMS:
                if i + 1 >= n:
                    self.seen[tuple(toks[i + 1 - n : i + 1])] = i + 1
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
                    return toks[end : end + most]
        return []


def vocabulary_difference(model: Path, draft: Path) -> str | None:
    """How the draft's vocabulary differs from the model's (the first token whose text differs, or their sizes),
    None when they are the same: a draft's token ids must mean what the model's do."""
    lib = llamacpp.runtime()
    a, b = llamacpp.open_vocab(model), llamacpp.open_vocab(draft)
    try:
        va, vb = a._model.vocab, b._model.vocab
        na, nb = lib.llama_vocab_n_tokens(va), lib.llama_vocab_n_tokens(vb)
        if na != nb:
            return f"{nb} tokens, the model's {na}"
        for t in range(na):
            ta, tb = lib.llama_vocab_get_text(va, t), lib.llama_vocab_get_text(vb, t)
            if ta != tb:
                return f"token {t} is {tb.decode('utf-8', 'replace')!r}, the model's {ta.decode('utf-8', 'replace')!r}"
        return None
    finally:
        a.close()
        b.close()


class DraftModel:
    """A second, smaller model with the served model's vocabulary that guesses each greedy request's next tokens.

    Its context has a sequence per slot of the served model's batch, holding the same tokens as that slot: each
    step it first reads what the request gained since the last step (its next token, and the tokens the served model
    kept), then decodes greedily one position at a time, every drafting slot in one llama_decode per position. What
    the served model did not keep is dropped from the draft's cells the next step, as it finds them differ."""

    def __init__(self, backend, path: Path, slots: int):
        if (why := vocabulary_difference(backend.path, path)) is not None:
            raise ModelError(f"--draft-model {path}: its vocabulary is not the model's ({backend.path.name}): {why}")
        # same context per slot and the same threads, batch and layers on the GPU as the served model
        self.backend = LlamaCppBackend(
            path,
            n_ctx=backend.context_length,
            n_threads=backend.n_threads,
            n_batch=backend.n_batch,
            gpu_layers=backend.gpu_layers,
        )
        self.batch = self.backend.new_batch(slots)
        for i in range(slots):
            self.batch.start(i, Sampling(temperature=0))  # greedy: each row's largest logit
        self.synced = [0] * slots  # tokens at the start of each slot's cells known to be the request's

    def claim(self, slot: int, prompt: list[int], reuse: bool) -> None:
        """A new request on this slot: keep the longest start of its prompt the cells hold (reuse), else nothing."""
        cells = self.batch.slots[slot].cached
        keep = common_prefix(cells, prompt[:-1]) if reuse else 0
        self.batch.drop(slot, len(cells) - keep)
        self.synced[slot] = keep

    def propose(self, wants: dict[int, tuple[list[int], int]]) -> dict[int, list[int]]:
        """{slot: up to n tokens to follow the request's tokens} for {slot: (its tokens so far, n)}."""
        b, pending, drafts = self.batch, {}, {slot: [] for slot in wants}
        for slot, (tokens, _) in wants.items():
            cells = b.slots[slot].cached
            keep = self.synced[slot] + common_prefix(cells[self.synced[slot] :], tokens[self.synced[slot] :])
            keep = min(keep, len(tokens) - 1)  # the last token is decoded again if need be, for its logits
            b.drop(slot, len(cells) - keep)
            pending[slot] = tokens[keep:]
            self.synced[slot] = len(tokens)
        while pending:  # what each slot gained, in chunks of the batch; logits at its last token
            feeds, budget = [], b.n_batch
            for slot in list(pending):
                if budget <= 0:
                    break
                chunk, rest = pending[slot][:budget], pending[slot][budget:]
                budget -= len(chunk)
                feeds.append((slot, chunk, not rest))
                if rest:
                    pending[slot] = rest
                else:
                    del pending[slot]
            for slot, token in b.sample(b.decode(feeds)).items():
                drafts[slot].append(token)
        while live := [slot for slot, (_, n) in wants.items() if len(drafts[slot]) < n]:
            rows = b.decode([(slot, [drafts[slot][-1]], True) for slot in live])
            for slot, token in b.sample(rows).items():
                drafts[slot].append(token)
        return drafts

    def forget(self) -> None:
        """After a failed step: nothing the cells hold can be trusted."""
        self.batch.forget()
        self.synced = [0] * len(self.synced)

    def close(self) -> None:
        self.batch.close()
        self.backend.close()
