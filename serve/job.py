"""A request as the engines see it: the job (prompt, sampling, limits, and the channel its results travel back to the
event loop on), how its tokens become text (`Decoding`: stop tokens, stop strings, max_tokens, cancel, deadline) and
how it finished.

Results travel back to the event loop through a deque guarded by a lock, with at most one pending wake-up per job:
a fast model produces tokens faster than the loop needs to hear about each one separately. The batched engine goes
further: a job it runs has an outbox, and the engine wakes the loop once per decode step for every job that has new
items, rather than once per job, and from a thread of its own (`Waker`): waking a loop hands it the GIL, and the
engine's thread should not wait for it back before its next llama_decode (which lets go of the GIL anyway).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend, Sampling


class QueueFull(Exception):
    """No free slot or worker and no place in the queue (the API answers 429)."""


class PoolClosed(Exception):
    """The server is shutting down (503)."""


def admit(closed: bool, waiting: int, max_queue: int, workers: int, busy: int) -> None:
    """The admission rule both pools apply under their lock: a request waits if a worker or slot is free or the
    queue has room (`max_queue` beyond the free ones), else 429; nothing is taken while shutting down (503)."""
    if closed:
        raise PoolClosed("the server is shutting down")
    if waiting >= max_queue + max(0, workers - busy):
        raise QueueFull(f"the queue is full ({max_queue} waiting)")


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
            out, self.buf = self.buf[: min(hits)], ""
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
        self.outbox: list[Job] | None = None  # where emit leaves the job for the engine's wake() (None: wake now)

    # ---- worker side ----
    def emit(self, item) -> None:
        if self.first_text is None and isinstance(item, str):
            self.first_text = time.monotonic()
        with self._lock:
            self._items.append(item)
            due, self._pending = not self._pending, True
        if due:
            if self.outbox is not None:
                self.outbox.append(self)
            else:
                wake([self])

    # ---- event-loop side ----
    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self):
        """Lists of text pieces (one per token that completed text) and, when asked for, Scored tokens, as the
        worker produces them; ends when the job finishes (then `self.finish` is set). Raises TimeoutError if the
        deadline passes first (the worker is told to stop)."""
        while True:
            try:
                async with asyncio.timeout_at(self.loop.time() + max(self.deadline - time.monotonic(), 0.001) + 0.5):
                    await self._wake.wait()
            except TimeoutError:
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


def wake(jobs: list[Job]) -> None:
    """Tell the event loops of these jobs that they have new items: one call_soon_threadsafe per loop."""
    loops: dict = {}
    for job in jobs:
        loops.setdefault(job.loop, []).append(job)
    for loop, group in loops.items():
        try:
            loop.call_soon_threadsafe(_set, group)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening any more
            for job in group:
                job.cancelled.set()


def _set(jobs: list[Job]) -> None:
    for job in jobs:
        job._wake.set()


class Waker:
    """A thread that wakes the event loops of the jobs handed to it (`put`), in the order they come. Handing over
    never waits: the engine's thread puts a list on a queue and goes on."""

    def __init__(self):
        self._queue: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="model-wake", daemon=True)
        self._thread.start()

    def put(self, jobs: list[Job]) -> None:
        self._queue.put(jobs)

    def close(self) -> None:
        """After every job handed over so far is woken."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (jobs := self._queue.get()) is not None:
            while not self._queue.empty():  # what came meanwhile, in the same wake-up
                more = self._queue.get()
                if more is None:
                    wake(jobs)
                    return
                jobs += more
            wake(jobs)


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

    def finish(self, cached_tokens: int = 0) -> Finish:
        """Releases what the detokenizer and the stop matcher still hold; the Finish to emit (cached_tokens: prompt
        tokens the engine reused from the slot's cache)."""
        if not self.hit and self.reason in ("stop", "length"):
            text, self.hit = self.stopper.push(self.detok.flush())
            text += "" if self.hit else self.stopper.flush()
            if text:
                self.job.emit(text)
            if self.hit:
                self.reason = "stop"
        return Finish(self.reason, len(self.job.prompt), self.n, cached_tokens=cached_tokens)
