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
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from aegis import llamacpp

from .base import Sampling

log = logging.getLogger(__name__)
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data's layout
KV_SIZE = re.compile(r"K \((\w+)\):\s*([\d.]+) MiB, V \((\w+)\):\s*([\d.]+) MiB")  # llama.cpp's KV cache line


@dataclass
class Slot:
    seq: int  # llama.cpp sequence id
    cached: list[int] = field(default_factory=list)  # the tokens whose KV this slot's cells hold, in order
    sampler: object = None  # the running request's sampler chain (None while free)
    grammar: object = None  # its grammar, with the control tokens banned, apart from the chain (None: unconstrained)


def placement(lib, model, gpu_layers: int) -> str:
    """Where the layers went, counted as llama.cpp counts them (the output layer is one more)."""
    total = lib.llama_model_n_layer(model) + 1
    if not lib.llama_supports_gpu_offload():
        return "CPU only (this llama.cpp build has no GPU backend)"
    on_gpu = total if gpu_layers < 0 else min(gpu_layers, total)
    return f"{on_gpu}/{total} layers on the GPU" + ("" if on_gpu == total else " (--n-gpu-layers)")


class LlamaBatch:
    """One context with `slots` sequences. Not thread-safe: the scheduler thread alone calls it."""

    def __init__(self, backend, slots: int, cache_type: str = "f16"):
        lib = self.lib = llamacpp.runtime()
        self.backend = backend
        self.slots = [Slot(i) for i in range(slots)]
        self.n_batch = max(backend.n_batch, slots)
        self.model = llamacpp.load_model(backend.path, backend.loader.extra_bufts, backend.gpu_layers)
        self.placement = placement(lib, self.model, backend.gpu_layers)
        log.info("%s: %s", backend.path.name, self.placement)
        # the same context as export's recorded greedy replies (aegis.llamacpp.greedy), per slot
        cp = llamacpp.context_params(backend.context_length, slots, self.n_batch, backend.n_threads, cache_type)
        self.ctx, said = _logged(lib, lambda: lib.llama_init_from_model(self.model, cp))
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"{backend.path}: llama.cpp could not make a context of {cp.n_ctx} tokens for "
                               f"{slots} slots (memory?)")
        self.mem = lib.llama_get_memory(self.ctx)
        # llama.cpp's own account of the memory its KV cache took (K and V of each cache it made)
        self.kv_mib = sum(float(m[1]) + float(m[3]) for m in KV_SIZE.findall(said)) or None
        log.info("%s: KV cache %s%s for %d slots of %d positions", backend.path.name, cache_type,
                 f", {self.kv_mib:.2f} MiB" if self.kv_mib else "", slots, backend.context_length)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._pool = ThreadPoolExecutor(min(slots, os.cpu_count() or 1), thread_name_prefix="aegis-grammar")
        banned = backend.controls_not_eog
        self._ban = (lib.llama_logit_bias * len(banned))(*[lib.llama_logit_bias(int(t), -np.inf) for t in banned])

    # ---- slots ----------------------------------------------------------------------------------------------
    def claim(self, free: list[int], prompt: list[int], reuse: bool) -> tuple[int, int]:
        """(slot, tokens kept) for a new request among the free slots: the one whose cells already hold the
        longest start of this prompt (all but its last token at most: that one is decoded for the first logits),
        else the first free one. The slot's cells beyond the kept part are cleared."""
        best, keep = free[0], 0
        if reuse:
            for i in free:
                n = _common(self.slots[i].cached, prompt[:-1])
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
        slot.sampler = self._chain(sampling)
        slot.grammar = self._grammar(sampling.grammar) if sampling.grammar else None

    def release(self, index: int) -> None:
        """The request on this slot is done; its cells stay for a later request that shares their prefix."""
        slot = self.slots[index]
        for name in ("sampler", "grammar"):
            if getattr(slot, name) is not None:
                self.lib.llama_sampler_free(getattr(slot, name))
                setattr(slot, name, None)

    def _chain(self, s: Sampling):
        lib = self.lib
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = lib.llama_sampler_chain_init(params)

        def add(sampler):
            lib.llama_sampler_chain_add(chain, sampler)

        if s.presence_penalty or s.frequency_penalty:
            # OpenAI's penalties count the tokens generated so far: the chain sees only those
            add(lib.llama_sampler_init_penalties(self.n_vocab, self.backend.context_length, 1.0,
                                                 s.frequency_penalty, s.presence_penalty))
        if s.temperature <= 0:
            add(lib.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            add(lib.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            add(lib.llama_sampler_init_top_p(s.top_p, 1))
        add(lib.llama_sampler_init_temp(s.temperature))
        add(lib.llama_sampler_init_dist(lib.LLAMA_DEFAULT_SEED if s.seed is None else s.seed % 0xFFFFFFFF))
        return chain

    # ---- one step -------------------------------------------------------------------------------------------
    def decode(self, feeds: list[tuple[int, list[int], bool | int]]) -> dict[int, int]:
        """One llama_decode of (slot, tokens, logits wanted: for the last token, or for the last n) for several
        slots, at most n_batch tokens in all; {slot: the row of its first logits} (the others follow it)."""
        b, rows, n = self.batch, {}, 0
        for index, tokens, want in feeds:
            slot = self.slots[index]
            for j, token in enumerate(tokens):
                b.token[n] = token
                b.pos[n] = len(slot.cached) + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = slot.seq
                b.logits[n] = j >= len(tokens) - want
                n += 1
            if want and tokens:
                rows[index] = n - min(int(want), len(tokens))
        if n == 0:
            return rows
        b.n_tokens = n
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {n} tokens")
        for index, tokens, _ in feeds:
            self.slots[index].cached.extend(tokens)
        return rows

    def _grammar(self, text: str):
        """A chain of the control-token ban and the grammar: under a grammar only text tokens and end-of-generation
        (llama.cpp's grammar reads a control token as its text: "<|user|>" fits inside a JSON string)."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if len(self._ban):
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(self.n_vocab, len(self._ban),
                                                                               self._ban))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_grammar(self.vocab, text.encode("utf-8"), b"root"))
        return chain

    def sample(self, rows: dict[int, int]) -> dict[int, int]:
        """Each slot's next token from the logits at its batch row (its samplers also record it). Slots under a
        grammar are sampled on threads at once: a grammar spends its time inside llama.cpp, where ctypes lets go of
        the GIL, so several constrained requests cost the decode thread about as much as one."""
        lib, out = self.lib, {}
        constrained = {i: np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
                       for i, row in rows.items() if self.slots[i].grammar is not None}  # read here: not thread-safe
        running = {i: self._pool.submit(self._constrained, self.slots[i], logits) for i, logits in constrained.items()}
        for i, row in rows.items():
            if i not in constrained:
                out[i] = lib.llama_sampler_sample(self.slots[i].sampler, self.ctx, row)
        return out | {i: f.result() for i, f in running.items()}

    def _constrained(self, slot: Slot, logits: np.ndarray) -> int:
        """The chain picks first and the grammar checks that one token; only when it refuses does the grammar mask
        the whole vocabulary and the chain pick again. Checking a token costs microseconds, masking the vocabulary
        milliseconds. Greedy picks what it would have picked under the mask; sampling draws the allowed tokens in
        proportion to their probability either way, as llama.cpp's own common sampler does."""
        token = self._pick(logits, [slot.sampler])
        if not self._allows(slot.grammar, token):
            token = self._pick(logits, [slot.grammar, slot.sampler])
        self.lib.llama_sampler_accept(slot.grammar, token)
        self.lib.llama_sampler_accept(slot.sampler, token)
        return token

    def _candidates(self, cur: np.ndarray):
        lib = self.lib
        data = cur.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))
        return lib.llama_token_data_array(data=data, size=len(cur), selected=-1, sorted=False)

    def _pick(self, logits: np.ndarray, samplers: list) -> int:
        """The token the samplers choose among the whole vocabulary (nothing recorded)."""
        cur = np.empty(self.n_vocab, TOKEN_DATA)
        cur["id"], cur["logit"], cur["p"] = np.arange(self.n_vocab), logits, 0.0
        array = self._candidates(cur)
        for sampler in samplers:
            self.lib.llama_sampler_apply(sampler, ctypes.byref(array))
        return int(array.data[array.selected].id)  # a sampler may sort the candidates in place

    def _allows(self, grammar, token: int) -> bool:
        cur = np.array([(token, 0.0, 0.0)], TOKEN_DATA)
        array = self._candidates(cur)
        self.lib.llama_sampler_apply(grammar, ctypes.byref(array))
        return bool(np.isfinite(cur["logit"][0]))

    def logits(self, row: int) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        self._pool.shutdown()
        for i in range(len(self.slots)):
            self.release(i)
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None


def _logged(lib, make):
    """make()'s result and what llama.cpp logged meanwhile (the server drops its log otherwise)."""
    said, previous, data = [], lib.llama_log_callback(), ctypes.c_void_p()
    lib.llama_log_get(ctypes.byref(previous), ctypes.byref(data))

    @lib.llama_log_callback
    def keep(level, text, user_data):  # noqa: ARG001
        said.append(text.decode("utf-8", "replace"))

    lib.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        return make(), "".join(said)
    finally:
        lib.llama_log_set(previous, data)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

