"""llama.cpp through llama-cpp-python, on a GGUF file (CPU here; GPU where llama-cpp-python is built with CUDA).

The vocabulary is a vocab-only load of the same file (no weights, no context), so tokenizing on request threads never
touches a worker's context. Each worker gets its own `Llama` (the weights are memory-mapped, so they are shared).
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from aegis import llamacpp

from .base import Backend, Control, Detokenizer, Sampling, Session, end_of_turn_ids

log = logging.getLogger(__name__)


def _quiet_logs() -> None:
    # llama.cpp writes its loader chatter straight to stderr from C; route it through a no-op callback.
    llama_cpp = llamacpp.runtime()

    @llama_cpp.llama_log_callback
    def _drop(level, text, user_data):  # noqa: ARG001
        pass

    global _LOG_CALLBACK
    _LOG_CALLBACK = _drop  # keep a reference: llama.cpp holds the raw pointer
    llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))


_LOG_CALLBACK = None


class LlamaDetokenizer(Detokenizer):
    def __init__(self, piece):
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._piece(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class LlamaSession(Session):
    def __init__(self, llm, text_only: np.ndarray):
        self.llm = llm
        self._text_only = [self._ban(text_only)]

    @staticmethod
    def _ban(ids: np.ndarray):
        def ban(_input_ids, logits):
            logits[ids] = -np.inf
            return logits
        return ban

    def generate(self, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        llama_cpp = llamacpp.runtime()
        from llama_cpp.llama_grammar import LlamaGrammar

        seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed % 0xFFFFFFFF
        self.llm.set_seed(seed)  # read when generate() builds its sampler chain
        grammar = LlamaGrammar.from_string(sampling.grammar) if sampling.grammar else None
        self._prefill(prompt)
        # Llama.generate reuses the longest cached prefix of the previous prompt on this context (multi-turn chats
        # re-evaluate only the new turn). min_p and typical are neutral so the OpenAI parameters mean what they say.
        return self.llm.generate(prompt, top_k=sampling.top_k, top_p=sampling.top_p, min_p=0.0, typical_p=1.0,
                                 temp=sampling.temperature, repeat_penalty=1.0,
                                 frequency_penalty=sampling.frequency_penalty,
                                 presence_penalty=sampling.presence_penalty, grammar=grammar,
                                 # llama.cpp's grammar reads a control token as its text ("<|user|>" fits a JSON
                                 # string): under a grammar only text tokens, and end-of-generation once it is done
                                 logits_processor=self._text_only if grammar else None)

    def _prefill(self, prompt: list[int]) -> None:
        """Decode all of the prompt but its last token, reusing what this context already holds, so that generate()
        always decodes the last one alone. llama.cpp sums in another order for a batch of tokens than for one, so
        the first logits of a prompt decoded whole and of the same prompt found in the cache differ in the last
        digits, and a seeded sample can fall on a neighbouring token: with this, one seed gives one text whatever the
        worker saw before."""
        llm, head = self.llm, prompt[:-1]
        keep = 0
        for cached, wanted in zip(llm.input_ids[:llm.n_tokens].tolist(), head):
            if cached != wanted:
                break
            keep += 1
        llm.n_tokens = keep  # eval() drops the context's memory from here on
        llm.eval(head[keep:])

    def logits(self) -> np.ndarray:
        llama_cpp = llamacpp.runtime()
        # the last decoded position is the one the yielded token was sampled from (the next decode has not run)
        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).copy()

    def close(self) -> None:
        self.llm.close()


class LlamaCppBackend(Backend):
    kind = "llama.cpp"
    supports_grammar = True

    def __init__(self, path: Path, n_ctx: int = 0, n_threads: int = 0, n_batch: int = 512, gpu_layers: int = -1,
                 workers: int = 1):
        llama_cpp = llamacpp.runtime()

        _quiet_logs()
        self.path = Path(path)
        self._vocab_llm = llama_cpp.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        model = self._vocab_llm._model
        self._vocab = model.vocab
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(self._vocab)
        # a vocab-only load has no hyperparameters (n_ctx_train() is 0): read the context from the metadata
        meta = self._vocab_llm.metadata
        arch = meta.get("general.architecture", "")
        n_ctx_train = int(meta.get(f"{arch}.context_length", 0) or 0) or 4096
        # Long-context models (Phi-3.5: 128k) would reserve a huge KV cache per worker; 4096 unless asked.
        self.context_length = n_ctx or min(n_ctx_train, 4096)
        short = llamacpp.trained_context(self.path)
        if short and short < min(self.context_length, n_ctx_train):
            # llama.cpp picks LongRoPE's factors once per context, transformers per sequence
            log.info("%s: a context of %d is above the original %d, so llama.cpp applies the long rope factors to "
                     "every prompt; --ctx-size %d runs short prompts as transformers does", self.path.name,
                     self.context_length, short, short)
        self.n_ctx_train = n_ctx_train
        # half the cores split among the workers, as llama-cpp-python's own server does: on shared or busy cores
        # more threads than free cores make llama.cpp's thread barriers spin and slow everything down
        self.n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2 // max(1, workers))
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
                self.controls[self._text(tid)] = Control(tid, bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP),
                                                         bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP))
        self._controls_not_eog = np.array(sorted(c.id for c in self.controls.values()
                                                 if not llama_cpp.llama_vocab_is_eog(self._vocab, c.id)), dtype=np.int64)
        stops = end_of_turn_ids(self._lookup)
        stops |= {t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        self.stop_ids = frozenset(stops)
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

    def check_grammar(self, grammar: str) -> bool:
        """Whether llama.cpp's own parser accepts the GBNF (checked on the request thread, before any worker)."""
        llama_cpp = llamacpp.runtime()
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (b"" for control tokens), cached: the vocabulary never changes."""
        got = self._pieces.get(token)
        if got is None:
            llama_cpp = llamacpp.runtime()
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n > len(buf):  # a piece longer than the buffer: ask again with the size it told us
                buf = ctypes.create_string_buffer(n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            got = self._pieces[token] = buf.raw[:max(n, 0)]
        return got

    def detokenizer(self) -> Detokenizer:
        return LlamaDetokenizer(self.token_bytes)

    def new_session(self) -> Session:
        llm = llamacpp.open_model(self.path, extra_bufts=self.loader.extra_bufts, n_ctx=self.context_length,
                                  n_batch=self.n_batch, n_threads=self.n_threads, n_threads_batch=self.n_threads,
                                  n_gpu_layers=self.gpu_layers, verbose=False)
        return LlamaSession(llm, self._controls_not_eog)

    def close(self) -> None:
        self._vocab_llm.close()
