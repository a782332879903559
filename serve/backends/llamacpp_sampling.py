"""The samplers of the batched llama.cpp context (serve/backends/llamacpp_batch.py): a request's sampler chain built
from its Sampling, and the pick of a token by samplers run over the whole vocabulary (a grammar's mask already
applied to the logits: serve/backends/guides.py). Each function takes llama-cpp-python's low-level module
(`lib`) and records nothing in a sampler unless it says so."""

from __future__ import annotations

import ctypes

import numpy as np

from .base import Sampling

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data's layout


def chain(lib, s: Sampling, n_vocab: int, n_ctx: int):
    """The sampler chain of one request: OpenAI's penalties, then greedy, or top-k, top-p, temperature and a draw."""
    params = lib.llama_sampler_chain_default_params()
    params.no_perf = True
    made = lib.llama_sampler_chain_init(params)

    def add(sampler):
        lib.llama_sampler_chain_add(made, sampler)

    if s.presence_penalty or s.frequency_penalty:
        # OpenAI's penalties count the tokens generated so far: the chain sees only those
        add(lib.llama_sampler_init_penalties(n_vocab, n_ctx, 1.0, s.frequency_penalty, s.presence_penalty))
    if s.temperature <= 0:
        add(lib.llama_sampler_init_greedy())
        return made
    if s.top_k > 0:
        add(lib.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        add(lib.llama_sampler_init_top_p(s.top_p, 1))
    add(lib.llama_sampler_init_temp(s.temperature))
    add(lib.llama_sampler_init_dist(lib.LLAMA_DEFAULT_SEED if s.seed is None else s.seed % 0xFFFFFFFF))
    return made


def _candidates(lib, cur: np.ndarray):
    data = cur.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))
    return lib.llama_token_data_array(data=data, size=len(cur), selected=-1, sorted=False)


def pick(lib, ids: np.ndarray, logits: np.ndarray, samplers: list) -> int:
    """The token the samplers choose among the whole vocabulary (ids: every token id, in order)."""
    cur = np.empty(len(ids), TOKEN_DATA)
    cur["id"], cur["logit"], cur["p"] = ids, logits, 0.0
    array = _candidates(lib, cur)
    for sampler in samplers:
        lib.llama_sampler_apply(sampler, ctypes.byref(array))
    return int(array.data[array.selected].id)  # a sampler may sort the candidates in place


def argmax_rows(logits: np.ndarray, pool, threads: int) -> np.ndarray:
    """Each row's first largest logit, which is what llama.cpp's greedy sampler picks. Many rows are split among the
    pool's threads (numpy lets go of the GIL): rows just copied from a GPU are read from memory, not from a cache,
    and one thread took 0.88 ms for 64 rows of 32 064 on an H100 machine."""
    if threads <= 1 or len(logits) < 16:
        return logits.argmax(axis=1)
    return np.concatenate(list(pool.map(lambda part: part.argmax(axis=1), np.array_split(logits, threads))))
