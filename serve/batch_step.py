"""One decode step of the batched engine (serve/batch.py's scheduler thread runs it): every running request's
feed (its next token, perhaps drafted ones after it, or a chunk of its prompt), one llama_decode, and each request's
token(s) sampled and handed to its Decoding (text, stop strings, limits).

Where llama_decode only queues the step and returns (a GPU), a token that can end its request only by a stop string
is fed to the next step at once and its text is made while that step computes, instead of before it is queued:
the GPU no longer waits for the detokenizer and the stop matcher. A stop string found then ends the request, and the
token the step computed for it is dropped (its cell stays, as any cell of an ended request does)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .job import Decoding, Job
from .speculate import Drafter


@dataclass(eq=False)
class Running:
    job: Job
    decoding: Decoding
    pending: list[int]  # prompt tokens still to read, all but the last
    next_token: int | None = None  # the prompt's last token, then each sampled one: decoded next step, for logits
    cached: int = 0  # prompt tokens found in the slot's cells
    drafter: Drafter | None = None  # a greedy request's prompt lookup (--speculate), None: it does not speculate
    draft: list[int] | None = None  # the tokens drafted for this step
    unsaid: int | None = None  # a token fed already whose text waits for the next step's llama_decode (see Step)


class Step:
    """BatchPool's step, apart (a mixin: it uses the pool's _batch, _draft_model, backend, speculate, counters and
    _finish). say_later: whether text may wait for the next llama_decode (the pool sets it from its batch)."""

    say_later = False

    def _step(self, running: dict[int, Running]) -> None:
        feeds, budget = [], self._batch.n_batch
        generating = [(slot, r) for slot, r in running.items() if r.next_token is not None]
        budget -= len(generating)
        rooms = {}
        for slot, r in generating:  # every generating request moves one token each step, perhaps with a draft
            rooms[slot] = self._room(r, budget)
            budget -= rooms[slot]
        drafts = self._drafts(running, rooms)
        for slot, r in generating:
            r.draft = drafts.get(slot, [])
            budget += rooms[slot] - len(r.draft)
            feeds.append((slot, [r.next_token, *r.draft], 1 + len(r.draft)))
        # then prompts, in arrival order, in chunks that fit the batch. A prompt's last token waits for the next
        # step, where it is decoded as generating tokens are: the first logits then come out of the same kind of
        # step whether the rest of the prompt was read now or found in the cache (llama.cpp sums a batch of one
        # sequence's tokens in another order than single tokens, and a seeded sample could tell the difference)
        for slot, r in running.items():
            if r.next_token is None and r.pending and budget > 0:
                chunk, r.pending = r.pending[:budget], r.pending[budget:]
                feeds.append((slot, chunk, False))
                budget -= len(chunk)
                if not r.pending:
                    r.next_token = r.job.prompt[-1]
        t0, c0 = time.perf_counter(), time.thread_time()
        rows = self._batch.decode(feeds, meanwhile=lambda: self._say(running))
        self.decode_s += time.perf_counter() - t0
        self.decode_cpu_s += time.thread_time() - c0
        self.steps += 1
        self.sequences += len(feeds)
        rows = {slot: row for slot, row in rows.items() if slot in running}  # a stop string found meanwhile
        accepted = self._accept(rows, running)
        for slot, why in self._batch.refused.items():  # a grammar with no way on: that request fails, not the rest
            self._finish(slot, running, error=why)
        self._batch.refused.clear()
        for slot, tokens in accepted.items():  # only the generating feeds asked for logits
            r = running[slot]
            for i, token in enumerate(tokens):
                r.next_token = token
                if r.drafter is not None:
                    r.drafter.extend([token])
                if self._later(r, tokens):
                    r.unsaid = token
                elif r.decoding.push(token, lambda row=rows[slot] + i: self._batch.logits(row)):
                    r.next_token = None
                    self._finish(slot, running)
                    break

    def _room(self, r: Running, budget: int) -> int:
        """How many tokens may be drafted after r.next_token: no more than its drafter wants, and than the batch, the
        slot's context and the request's max_tokens leave room for."""
        if r.drafter is None or budget <= 0:
            return 0
        context_left = self.backend.context_length - len(r.drafter.tokens)
        return max(0, min(r.drafter.want(), budget, context_left, r.job.max_tokens - r.decoding.n - 1))

    def _drafts(self, running: dict[int, Running], rooms: dict[int, int]) -> dict[int, list[int]]:
        """Each slot's guesses: the draft model's, all slots at once, or else each request's prompt lookup."""
        wants = {slot: n for slot, n in rooms.items() if n > 0}
        if self._draft_model is not None:
            return self._draft_model.propose({slot: (running[slot].drafter.tokens, n) for slot, n in wants.items()})
        return {slot: running[slot].drafter.draft(n) for slot, n in wants.items()}

    def _accept(self, rows: dict[int, int], running: dict[int, Running]) -> dict[int, list[int]]:
        """Each slot's tokens of this step: the one sampled after its next token, then, while the last one is the
        token drafted there, the one sampled at the drafted position (all slots at a position in one sample call,
        in order, so each sampler records exactly the tokens plain decoding would have). Drafted tokens past the
        first miss leave the slot's cells."""
        out = {slot: [token] for slot, token in self._batch.sample(rows).items()}
        k = 0
        while live := {
            slot: rows[slot] + 1 + k
            for slot, tokens in out.items()
            if len(tokens) == k + 1 and k < len(running[slot].draft or ()) and tokens[-1] == running[slot].draft[k]
        }:
            for slot, token in self._batch.sample(live).items():
                out[slot].append(token)
            k += 1
        for slot, tokens in out.items():
            drafted = len(running[slot].draft or ())
            if drafted:
                self.drafted += drafted
                self.accepted += len(tokens) - 1
                self._batch.drop(slot, drafted - (len(tokens) - 1))
                running[slot].drafter.kept(drafted, len(tokens) - 1)
        return out

    def _later(self, r: Running, tokens: list[int]) -> bool:
        """Whether this token's text may wait for the next step's llama_decode: only where that call only queues
        the step (a GPU), and only for a token that cannot end the request but by a stop string (not its first, not
        one ending the turn or reaching max_tokens, not one whose log-probabilities are read from this step's
        logits, which the next step overwrites, not a speculating request's)."""
        d = r.decoding
        return (
            self.say_later
            and len(tokens) == 1
            and d.n > 0
            and tokens[0] not in d.stop_ids
            and d.n + 1 < r.job.max_tokens
            and r.job.logprobs is None
            and r.drafter is None
        )

    def _say(self, running: dict[int, Running]) -> None:
        """The text of the tokens that waited, made while the GPU computes the step that feeds them; a request
        whose stop string this finds ends now (its token of this step is computed for nothing)."""
        for slot, r in list(running.items()):
            if r.unsaid is not None:
                token, r.unsaid = r.unsaid, None
                if r.decoding.push(token):
                    r.next_token = None
                    self._finish(slot, running)
