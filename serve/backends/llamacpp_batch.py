"""Many sequences through one llama.cpp context (continuous batching), on llama-cpp-python's low-level API.

The weights are loaded once. The context has one sequence id per slot, each with its own KV cells (the served
context length per slot, so a request never competes for cells with another), its own sampler chain, and a record of
the tokens its cells hold, so the next turn of a chat that lands on the same slot decodes only what is new. One
`decode` call feeds the next token of every generating slot and chunks of the prompts still being read, in one
llama_decode, which is what makes concurrent requests cheaper than running them one after another.
"""

from __future__ import annotations

import ctypes
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from aegis import llamacpp

from .base import Sampling
from .llamacpp_context import kv_mib, logged, placement
from .llamacpp_sampling import argmax_rows, chain, pick

log = logging.getLogger(__name__)


@dataclass
class Slot:
    seq: int  # llama.cpp sequence id
    cached: list[int] = field(default_factory=list)  # the tokens whose KV this slot's cells hold, in order
    sampler: object = None  # the running request's sampler chain (None while free)
    guide: object = None  # its grammar's llguidance matcher (None: unconstrained)
    greedy: bool = False  # greedy with no penalties: its token is the (allowed) row's first largest logit
    argmax: bool = False  # greedy and unconstrained: taken for all such rows at once


class LlamaBatch:
    """One context with `slots` sequences. Not thread-safe: the scheduler thread alone calls it."""

    def __init__(self, backend, slots: int, cache_type: str = "f16"):
        lib = self.lib = llamacpp.runtime()
        self.backend = backend
        self.slots = [Slot(i) for i in range(slots)]
        self.n_batch = max(backend.n_batch, slots)  # tokens a step may bring; with idle slots' placeholders:
        capacity = self.n_batch + slots - 1
        self.model = llamacpp.load_model(backend.path, backend.loader.extra_bufts, backend.gpu_layers)
        self.placement = placement(lib, self.model, backend.gpu_layers)
        log.info("%s: %s", backend.path.name, self.placement)
        # the same context as export's recorded greedy replies (aegis.llamacpp.greedy), per slot
        cp = llamacpp.context_params(backend.context_length, slots, capacity, backend.n_threads, cache_type)
        self.ctx, said = logged(lib, lambda: lib.llama_init_from_model(self.model, cp))
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(
                f"{backend.path}: llama.cpp could not make a context of {cp.n_ctx} tokens for {slots} slots (memory?)"
            )
        self.mem = lib.llama_get_memory(self.ctx)
        self.kv_mib = kv_mib(said)  # llama.cpp's own account of its KV cache's memory
        size = f", {self.kv_mib:.2f} MiB" if self.kv_mib else ""
        n = backend.context_length
        log.info("%s: KV cache %s%s for %d slots of %d positions", backend.path.name, cache_type, size, slots, n)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.batch = self._batch_arrays(capacity)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._logits = np.zeros((0, self.n_vocab), np.float32)  # the last decode's logits, one row per output
        self._best: np.ndarray | None = None  # each of those rows' largest logit, when a greedy slot asks
        self._view = (0, 0)  # the address and rows of that view
        self._at: list[int] | None = None  # each of those rows' place in the batch, when a sampling chain asks
        self._n = 0  # the last decode's tokens
        cores = os.cpu_count() or 1
        # sampling chains go to threads only where cores are left beside llama.cpp's (half of them by default):
        # on two cores a thread per part costs more hand-overs of the GIL than it saves
        self._chain_threads = min(slots, cores // 2) if cores > 2 else 1
        self._pool = ThreadPoolExecutor(self._chain_threads, thread_name_prefix="aegis-sample")
        self.refused: dict[int, str] = {}  # slots whose grammar allowed no token at the last sample, and why
        # on a GPU llama_decode only queues the step, so the grammar masks are made while it computes; and a token
        # costs next to nothing beside a pass of the weights, so idle slots fill the gaps between busy ones (decode)
        self.offloaded = bool(lib.llama_supports_gpu_offload()) and backend.gpu_layers != 0
        self._masks: dict[int, np.ndarray] = {}  # those masks, for this step's rows

    # ---- slots ----------------------------------------------------------------------------------------------
    def claim(self, free: list[int], prompt: list[int], reuse: bool) -> tuple[int, int]:
        """(slot, tokens kept) for a new request among the free slots: the one whose cells already hold the
        longest start of this prompt (all but its last token at most: that one is decoded for the first logits),
        else the first free one. The slot's cells beyond the kept part are cleared."""
        best, keep = free[0], 0
        if reuse:
            for i in free:
                n = common_prefix(self.slots[i].cached, prompt[:-1])
                if n > keep:
                    best, keep = i, n
        self._keep(self.slots[best], keep)
        return best, keep

    def drop(self, index: int, n: int) -> None:
        """Take the last n tokens out of the slot's cells (drafted tokens greedy decoding did not agree with)."""
        if n > 0:
            slot = self.slots[index]
            self._keep(slot, len(slot.cached) - n)

    def _keep(self, slot: Slot, keep: int) -> None:
        self.lib.llama_memory_seq_rm(self.mem, slot.seq, keep, -1)
        del slot.cached[keep:]

    def forget(self) -> None:
        """Clear every slot's cells (after a failed decode nothing they hold can be trusted)."""
        self.lib.llama_memory_clear(self.mem, True)
        for slot in self.slots:
            slot.cached.clear()

    def start(self, index: int, sampling: Sampling) -> None:
        slot = self.slots[index]
        self.release(index)
        lib = self.lib
        slot.sampler = chain(lib, sampling, self.n_vocab, self.backend.context_length)
        slot.guide = None
        if sampling.grammar:  # a copy of the matcher the request thread made (compiled here only if it made none)
            made = sampling.compiled
            slot.guide = made.deep_copy() if made is not None else self.backend.guides.compile(sampling.grammar)
        slot.greedy = sampling.temperature <= 0 and not sampling.presence_penalty and not sampling.frequency_penalty
        slot.argmax = slot.greedy and slot.guide is None

    def release(self, index: int) -> None:
        """The request on this slot is done; its cells stay for a later request that shares their prefix."""
        slot = self.slots[index]
        if slot.sampler is not None:
            self.lib.llama_sampler_free(slot.sampler)
            slot.sampler = None
        slot.guide = None

    # ---- one step -------------------------------------------------------------------------------------------
    def _batch_arrays(self, n: int):
        """A llama_batch over numpy arrays this object owns (one sequence per token), so that a step fills it with a
        few array writes instead of a ctypes store per field per token."""
        lib, i32 = self.lib, ctypes.POINTER(ctypes.c_int32)
        self._tok, self._pos, self._seq = (np.zeros(n, np.int32) for _ in range(3))
        self._nseq, self._want = np.ones(n, np.int32), np.zeros(n, np.int8)
        base = self._seq.ctypes.data
        self._seq_ptrs = (i32 * n)(*[ctypes.cast(base + 4 * i, i32) for i in range(n)])
        return lib.llama_batch(
            n_tokens=0,
            token=self._tok.ctypes.data_as(i32),
            embd=None,
            pos=self._pos.ctypes.data_as(i32),
            n_seq_id=self._nseq.ctypes.data_as(i32),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(i32)),
            logits=self._want.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def decode(self, feeds: list[tuple[int, list[int], bool | int]], meanwhile=None) -> dict[int, int]:
        """One llama_decode of (slot, tokens, logits wanted: for the last token, or for the last n) for several
        slots, at most n_batch tokens in all; {slot: the row of its first logits} (the others follow it). meanwhile()
        runs after llama_decode, before the logits are read: on a GPU, while the step computes.

        Each slot's cells are a stream of their own, and llama.cpp reads such a batch in one pass of the weights
        only for a run of consecutive sequence ids in increasing order (llama_batch_allocr::split_equal): any other
        order, or an idle slot between two busy ones, costs a whole pass more. So the slots go in order, and when
        offloaded each idle slot between the first and the last busy one reads a placeholder token, whose cell is
        removed after (on a CPU a token costs its compute, which may be more than a pass: there gaps stay)."""
        feeds = [f for f in feeds if f[1]]
        busy = {index for index, _, _ in feeds}
        gaps = set(range(min(busy), max(busy))) - busy if busy and self.offloaded else set()
        feeds = sorted(feeds + [(i, [self._placeholder(i)], False) for i in gaps], key=lambda f: f[0])
        toks, pos, seqs, want, rows, outputs = [], [], [], [], {}, 0
        for index, tokens, wanted in feeds:
            slot, k = self.slots[index], len(tokens)
            at, w = len(slot.cached), min(int(wanted), k)
            toks += tokens
            pos += range(at, at + k)
            seqs += [slot.seq] * k
            want += [0] * (k - w) + [1] * w
            if w:
                rows[index], outputs = outputs, outputs + w
        n = len(toks)
        if n == 0:
            return rows
        self._tok[:n], self._pos[:n], self._seq[:n], self._want[:n] = toks, pos, seqs, want
        self.batch.n_tokens = n
        rc = self.lib.llama_decode(self.ctx, self.batch)
        for i in gaps:  # placeholders' cells go (on failure too: forget() may not follow)
            self.lib.llama_memory_seq_rm(self.mem, self.slots[i].seq, len(self.slots[i].cached), -1)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {n} tokens")
        for index, tokens, _ in feeds:
            if index not in gaps:
                self.slots[index].cached.extend(tokens)
        if meanwhile is not None:
            meanwhile()
        self._masks = {}
        if self.offloaded and (guided := [i for i in rows if self.slots[i].guide is not None]):
            self._masks = dict(zip(guided, self.backend.guides.masks([self.slots[i].guide for i in guided])))
        if outputs:  # rows in batch order (llama.cpp keeps them so), read in place until the next decode
            # (llama_get_logits also puts llama.cpp's rows in order, once: what llama_sampler_sample reads after it
            # on the sampling threads is then only read)
            ptr = self.lib.llama_get_logits(self.ctx)
            view = (ctypes.addressof(ptr.contents), outputs)
            if view != self._view:  # llama.cpp keeps its buffer from step to step: so does the view of it
                self._logits, self._view = np.ctypeslib.as_array(ptr, shape=(outputs, self.n_vocab)), view
        self._best, self._at, self._n = None, None, n
        return rows

    def _placeholder(self, index: int) -> int:
        """A token for an idle slot to read at the end of its cells (made room for when they are full)."""
        slot = self.slots[index]
        if len(slot.cached) >= self.backend.context_length:
            self._keep(slot, len(slot.cached) - 1)
        return slot.cached[-1] if slot.cached else 0

    def sample(self, rows: dict[int, int]) -> dict[int, int]:
        """Each slot's next token from the logits at its row (its samplers also record it), all slots in one pass.
        A greedy slot's token is its row's first largest logit (what llama.cpp's greedy sampler picks), taken for
        every row at once. Where there are cores to spare, the slots with a sampling chain are split among threads:
        their time is spent inside llama.cpp, where ctypes lets go of the GIL. The slots under a grammar get their
        masks all at once meanwhile (Guides.masks). A slot whose grammar allows no token gets none: it is added to
        `refused` instead, which the caller empties."""
        out, slots = {}, self.slots
        argmax = [i for i in rows if slots[i].argmax]
        if argmax:
            if self._best is None:
                self._best = argmax_rows(self._logits, self._pool, self._chain_threads)
            out = {i: int(self._best[rows[i]]) for i in argmax}
        chains = [(i, rows[i]) for i in rows if not slots[i].argmax and slots[i].guide is None]
        if chains and self._at is None:
            self._at = np.flatnonzero(self._want[: self._n]).tolist()
        n = min(len(chains), self._chain_threads)
        running = [self._pool.submit(self._chains, chains[k::n]) for k in range(n)] if n > 1 else []
        if guided := [i for i in rows if slots[i].guide is not None]:
            out |= self._guided(guided, rows)
        if n <= 1:
            out |= self._chains(chains)
        for f in running:
            out |= f.result()
        return out

    def _chains(self, rows: list[tuple[int, int]]) -> dict[int, int]:
        """llama.cpp's own sampling of each slot's row, which also records the token in the slot's chain."""
        lib, ctx, slots, at = self.lib, self.ctx, self.slots, self._at
        return {i: lib.llama_sampler_sample(slots[i].sampler, ctx, at[row]) for i, row in rows}

    def _guided(self, guided: list[int], rows: dict[int, int]) -> dict[int, int]:
        """The slots under a grammar. The slot's own choice first (greedy's first largest logit, or its chain's draw),
        kept where the matcher accepts it (a microsecond, or a look at the mask made during the step); the refused
        ones get a mask (all at once, unless made already), the disallowed logits of a copy of their row set to -inf
        and the choice made again. Greedy then takes what it would have taken under the mask, and a draw is still in
        proportion to the allowed tokens' probability (a draw refused is drawn again among the allowed ones). The
        token is recorded in the matcher and the chain."""
        slots, out, refused, masks, self._masks = self.slots, {}, [], self._masks, {}
        greedy, banned = [i for i in guided if slots[i].greedy], self.backend.guides.banned
        firsts = dict(zip(greedy, self._logits[[rows[i] for i in greedy]].argmax(axis=1).tolist())) if greedy else {}
        for i in guided:
            slot = slots[i]
            token = firsts[i] if slot.greedy else pick(self.lib, self._ids, self._logits[rows[i]], [slot.sampler])
            if masks[i][token] if i in masks else slot.guide.validate_tokens([token]) == 1 and not banned(token):
                out[i] = token
            else:
                refused.append(i)
        if refused:
            if need := [i for i in refused if i not in masks]:
                masks |= dict(zip(need, self.backend.guides.masks([slots[i].guide for i in need])))
            for i in refused:
                slot, allowed = slots[i], masks[i]
                if not allowed.any():
                    self.refused[i] = f"the grammar allows no token here ({slot.guide.get_error() or 'a dead end'})"
                    continue
                logits = np.where(allowed, self._logits[rows[i]], -np.inf).astype(np.float32)
                out[i] = int(logits.argmax()) if slot.greedy else pick(self.lib, self._ids, logits, [slot.sampler])
        for i, token in list(out.items()):
            if not slots[i].guide.consume_token(token):
                self.refused[i] = f"the grammar refused token {token}: {slots[i].guide.get_error()}"
                del out[i]
                continue
            self.lib.llama_sampler_accept(slots[i].sampler, token)
        return out

    def logits(self, row: int) -> np.ndarray:
        return self._logits[row].copy()

    def close(self) -> None:
        self._pool.shutdown()
        for i in range(len(self.slots)):
            self.release(i)
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
