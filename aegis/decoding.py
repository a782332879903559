"""Greedy decoding as the server decodes (serve/batch.py), with the server's model loading and context parameters
(aegis/llamacpp.py) in the server's default context (aegis/gguf_context.py): export's parity records these replies,
and `python -m serve` gives the same at temperature 0."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .llamacpp import context_params, load_model, piece, runtime


@dataclass(frozen=True)
class Reply:
    ids: list[int]  # every token decoded, end-of-generation ones and what follows them included
    text: str  # the text of the tokens before the first end-of-generation token


def greedy(
    path: Path | str,
    prompts: list[list[int]],
    n_tokens: int,
    n_ctx: int,
    extra_bufts: bool = True,
    threads: int = 1,
    n_batch: int = 512,
    gpu_layers: int = -1,
) -> list[Reply]:
    """Each prompt's first n_tokens greedy tokens, decoded step by step as the server decodes one request
    (serve/batch.py): the prompt but its last token in chunks of n_batch, then the last token alone, then each
    chosen token alone."""
    import numpy as np  # imported here: the core's import stays light

    lib = runtime()
    model = load_model(path, extra_bufts, gpu_layers)
    ctx = lib.llama_init_from_model(model, context_params(n_ctx, 1, n_batch, threads))
    if not ctx:
        lib.llama_model_free(model)
        raise RuntimeError(f"{path}: llama.cpp could not make a context of {n_ctx} tokens")
    batch = lib.llama_batch_init(n_batch, 0, 1)
    vocab = lib.llama_model_get_vocab(model)
    n_vocab = lib.llama_vocab_n_tokens(vocab)

    def step(tokens: list[int], pos: int, want: bool) -> None:
        for j, token in enumerate(tokens):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, pos + j, 1
            batch.seq_id[j][0] = 0
            batch.logits[j] = want and j == len(tokens) - 1
        batch.n_tokens = len(tokens)
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError(f"{path}: llama_decode failed")

    out = []
    try:
        for prompt in prompts:
            if len(prompt) + n_tokens > n_ctx:
                raise ValueError(f"a prompt of {len(prompt)} tokens and {n_tokens} more exceed {n_ctx}")
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            for i in range(0, len(prompt) - 1, n_batch):
                step(prompt[i : min(i + n_batch, len(prompt) - 1)], i, False)
            token, pos, got = prompt[-1], len(prompt) - 1, []
            while len(got) < n_tokens:
                step([token], pos, True)
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, 0), shape=(n_vocab,))
                token, pos = int(logits.argmax()), pos + 1  # the first of equal logits, as llama.cpp's greedy
                got.append(token)
            end = next((i for i, t in enumerate(got) if lib.llama_vocab_is_eog(vocab, t)), len(got))
            text = b"".join(piece(vocab, t) for t in got[:end]).decode("utf-8", "replace")
            out.append(Reply(got, text))
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    return out
