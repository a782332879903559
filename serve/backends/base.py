"""The one interface between the API and a model runtime.

A `Backend` is a loaded model as the API sees it: its vocabulary (tokenize, detokenize), its chat template and
special tokens, its context length and its end-of-turn tokens. Tokenizing runs on the request's thread, so the API
can validate a prompt's length before it queues anything.

Decoding state (a llama.cpp context, a KV cache) is not thread-safe: llama.cpp's lives in one batch that a single
scheduler thread drives for every request (serve.batch); transformers' lives in a `Session` per worker thread.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from aegis import families, tool_format

# Every family's end-of-turn tokens (aegis/families/; Phi-3's turn markers among them: a small model that forgets
# <|end|> goes on to write the next turn itself, and that text must not reach the client).
END_OF_TURN = families.end_of_turn()


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters after validation; every backend reads the same fields."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    grammar: str | None = None  # GBNF the reply must follow (backends with supports_grammar only)
    compiled: object = field(default=None, compare=False, repr=False)  # the backend's compile_grammar(grammar)


@dataclass(frozen=True)
class Control:
    """A control token (<|user|>, <|end|>, <s>, ...): only the chat template may produce one. lstrip/rstrip: the
    tokenizer drops whitespace to its left/right, as the joint tokenization of a prompt does."""

    id: int
    lstrip: bool = False
    rstrip: bool = False


class Detokenizer(abc.ABC):
    """Turns generated token ids into text one at a time, holding back incomplete UTF-8 sequences."""

    @abc.abstractmethod
    def push(self, token: int) -> str:
        """Text that token completes (may be empty)."""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation."""
        return ""


class Session(abc.ABC):
    """One worker's private decoding state."""

    @abc.abstractmethod
    def generate(self, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        """Sampled token ids, one per step, until the caller stops iterating (the caller enforces every limit:
        stop tokens, max_tokens, cancellation, the deadline). Closing the iterator frees the session for the
        next job."""

    @abc.abstractmethod
    def logits(self) -> np.ndarray:
        """The model's raw logits (float, one per vocabulary entry) for the token generate() yielded last, read
        before the iterator is advanced again."""

    def close(self) -> None:
        pass


class Backend(abc.ABC):
    kind: str = "?"
    context_length: int
    vocab_size: int
    chat_template: str | None  # Jinja source as the model ships it, or None
    special_tokens: dict[str, str]  # bos_token, eos_token, ... for the template
    controls: dict[str, Control]  # control-token text -> token
    stop_ids: frozenset[int]  # end-of-turn tokens: generation stops there
    add_bos: bool  # whether a prompt starts with BOS (then a template that writes BOS gets no second one)
    bos_id: int | None
    supports_grammar: bool = False  # whether Sampling.grammar is honoured
    batched: bool = False  # new_batch (many requests in one decode) rather than new_session (one per worker)

    @abc.abstractmethod
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of text as a whole prompt: BOS in front when add_special and the model wants one; control-token
        text (<|user|>, ...) becomes the control token only when parse_special, else it is ordinary text."""

    @abc.abstractmethod
    def tokenize_text(self, text: str) -> list[int]:
        """Token ids of ordinary text inside a prompt (after a control token): no BOS, no control tokens."""

    @abc.abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (b"" for control tokens)."""

    @abc.abstractmethod
    def detokenizer(self) -> Detokenizer:
        pass

    def compile_grammar(self, grammar: str) -> object | None:
        """The runtime's compiled form of the GBNF, None where it refuses it (only asked where supports_grammar)."""
        return None

    def new_session(self) -> Session:
        """Decoding state for one worker of a worker pool (called once per worker, on that worker's thread)."""
        raise NotImplementedError(f"the {self.kind} backend decodes in batches (new_batch)")

    def new_batch(self, slots: int):
        """Decoding state for many requests at once, driven by serve.batch.BatchPool (backends with `batched`)."""
        raise NotImplementedError(f"the {self.kind} backend runs one request per worker (new_session)")

    @property
    def tool_format(self) -> tool_format.ToolFormat:
        """The tool-call format of the model's chat format (its family's, found by its chat template)."""
        return families.by_chat_template(self.chat_template).tool_format

    def close(self) -> None:
        pass


def end_of_turn_ids(lookup) -> set[int]:
    """Ids of the END_OF_TURN tokens a vocabulary has; lookup(text) -> id or None."""
    ids = set()
    for text in END_OF_TURN:
        tid = lookup(text)
        if tid is not None:
            ids.add(tid)
    return ids
