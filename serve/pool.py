"""A fixed pool of model workers behind a bounded queue.

llama.cpp contexts are not thread-safe, so each worker thread owns one `Session` and runs one job at a time. A job
that cannot get a place in the queue is refused at once (the API answers 429) rather than piling up. The worker
checks the job's cancel flag and deadline at every token, so a client that goes away, or a job past its timeout,
frees the worker at the next token.

Results travel back to the event loop through a deque guarded by a lock, with at most one pending wake-up per job:
a fast model produces tokens faster than the loop needs to hear about each one separately.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend, Sampling

log = logging.getLogger("serve.pool")


class QueueFull(Exception):
    pass


class PoolClosed(Exception):
    pass


@dataclass
class Finish:
    reason: str  # stop | length | cancelled | timeout | error
    prompt_tokens: int
    completion_tokens: int
    error: str = ""
    cached_tokens: int = 0  # prompt tokens whose KV was already in the slot (not decoded again)


@dataclass(frozen=True)
class Scored:
    """A generated token with its log-probability under the model and the most likely tokens at its place."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


def score(logits: np.ndarray, token: int, top_n: int) -> Scored:
    """Log-probabilities of the model's raw distribution (before temperature, penalties or a grammar)."""
    z = logits.astype(np.float64)
    z -= z.max()
    logp = z - np.log(np.exp(z).sum())
    top = []
    if top_n:
        best = np.argpartition(-logp, top_n - 1)[:top_n]
        top = [(int(i), float(logp[i])) for i in best[np.argsort(-logp[best], kind="stable")]]
    return Scored(token, float(logp[token]), top)


class StopMatcher:
    """Stop strings across token boundaries: text that could still turn into a stop string is held back, text
    before a completed stop string is released and the stop string itself is never sent (as OpenAI does)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass(eq=False)
class Job:
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stops: list[str]
    timeout: float
    loop: asyncio.AbstractEventLoop
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; else how many most-likely alternatives per token
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finish: Finish | None = None
    first_text: float | None = None  # when the first text was produced (time to first token)

    def __post_init__(self):
        self.deadline = self.submitted + self.timeout
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._pending = False
        self._wake = asyncio.Event()

    # ---- worker side ----
    def emit(self, item) -> None:
        if self.first_text is None and isinstance(item, str):
            self.first_text = time.monotonic()
        with self._lock:
            self._items.append(item)
            wake, self._pending = not self._pending, True
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop is closed (server shutting down): nobody is listening any more
                self.cancelled.set()

    # ---- event-loop side ----
    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self):
        """Lists of text pieces (one per token that completed text) and, when asked for, Scored tokens, as the
        worker produces them; ends when the job finishes (then `self.finish` is set). Raises TimeoutError if the
        deadline passes first (the worker is told to stop)."""
        while True:
            remaining = self.deadline - time.monotonic()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(remaining, 0.001) + 0.5)
            except asyncio.TimeoutError:
                self.cancel()
                raise TimeoutError from None
            self._wake.clear()
            with self._lock:
                self._pending = False
                items = list(self._items)
                self._items.clear()
            pieces = [i for i in items if not isinstance(i, Finish)]
            if pieces:
                yield pieces
            for item in items:
                if isinstance(item, Finish):
                    self.finish = item
                    return


class Decoding:
    """One job's generated tokens turned into what the client receives: end-of-turn tokens, stop strings,
    max_tokens, a cancel or the deadline end it, whichever comes first. Both engines (a worker running one job,
    the batch running many) feed it one token at a time."""

    def __init__(self, backend: Backend, job: Job):
        self.job = job
        self.detok = backend.detokenizer()
        self.stopper = StopMatcher(job.stops)
        self.stop_ids = frozenset() if job.ignore_eos else backend.stop_ids
        self.n, self.reason, self.hit = 0, "length", False

    def interrupted(self) -> bool:
        """Whether the client went away or the deadline passed (checked before each token is computed)."""
        if self.job.cancelled.is_set():
            self.reason = "cancelled"
        elif time.monotonic() > self.job.deadline:
            self.reason = "timeout"
        else:
            return False
        return True

    def push(self, token: int, logits=None) -> bool:
        """Take one sampled token; True when the job is done. logits(): the raw logits the token was sampled from,
        asked for only when the job wants log-probabilities."""
        if token in self.stop_ids:
            self.reason = "stop"
            return True
        self.n += 1
        if self.job.logprobs is not None:
            self.job.emit(score(logits(), token, self.job.logprobs))
        text, self.hit = self.stopper.push(self.detok.push(token))
        if text:
            self.job.emit(text)
        if self.hit:
            self.reason = "stop"
            return True
        return self.n >= self.job.max_tokens

    def finish(self) -> Finish:
        """Releases what the detokenizer and the stop matcher still hold; the Finish to emit."""
        if not self.hit and self.reason in ("stop", "length"):
            text, self.hit = self.stopper.push(self.detok.flush())
            text += "" if self.hit else self.stopper.flush()
            if text:
                self.job.emit(text)
            if self.hit:
                self.reason = "stop"
        return Finish(self.reason, len(self.job.prompt), self.n)


def run_job(backend: Backend, session, job: Job) -> Finish:
    """One job on a worker's own session (on the worker thread)."""
    dec = Decoding(backend, job)
    tokens = session.generate(job.prompt, job.sampling)
    try:
        for token in tokens:
            if dec.interrupted() or dec.push(token, session.logits):
                break
    finally:
        tokens.close()
    return dec.finish()


class WorkerPool:
    def __init__(self, backend: Backend, workers: int = 1, max_queue: int = 64, on_finish=None):
        """on_finish(job, finish) runs on the worker thread after every job, whether or not anyone still listens
        (a dropped stream's job is counted too)."""
        if workers < 1 or max_queue < 0:
            raise ValueError("workers must be >= 1 and the queue size >= 0")
        self.backend, self.workers, self.max_queue = backend, workers, max_queue
        self.on_finish = on_finish
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0  # jobs in the queue, not yet picked up
        self.busy = 0  # workers running a job
        self._threads: list[threading.Thread] = []
        self._closed = False

    def start(self) -> None:
        """Start the workers; each makes its own session. Blocks until all are ready; raises the first error."""
        ready, errors = threading.Barrier(self.workers + 1), []
        for i in range(self.workers):
            t = threading.Thread(target=self._work, args=(ready, errors), name=f"model-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        ready.wait()
        if errors:
            self.close()
            raise errors[0]

    def _work(self, ready: threading.Barrier, errors: list) -> None:
        try:
            session = self.backend.new_session()
        except Exception as e:  # noqa: BLE001 - reported to start(), which raises it
            errors.append(e)
            ready.wait()
            return
        ready.wait()
        if errors:
            session.close()
            return
        while True:
            job = self._queue.get()
            if job is None:
                break
            with self._lock:
                self.waiting -= 1
                self.busy += 1
            try:
                if job.cancelled.is_set():
                    finish = Finish("cancelled", len(job.prompt), 0)
                elif time.monotonic() > job.deadline:
                    finish = Finish("timeout", len(job.prompt), 0)
                else:
                    finish = run_job(self.backend, session, job)
            except Exception as e:  # noqa: BLE001 - a runtime failure ends this job, never the worker
                log.exception("generation failed")
                finish = Finish("error", len(job.prompt), 0, error=f"{type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self.busy -= 1
            if self.on_finish is not None:
                try:
                    self.on_finish(job, finish)
                except Exception:  # noqa: BLE001 - bookkeeping must never take a worker down
                    log.exception("on_finish failed")
            job.emit(finish)
        session.close()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise PoolClosed("the server is shutting down")
            if self.waiting >= self.max_queue + max(0, self.workers - self.busy):
                raise QueueFull(f"the queue is full ({self.max_queue} waiting)")
            self.waiting += 1
        self._queue.put(job)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)
