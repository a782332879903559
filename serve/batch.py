"""Continuous batching: one model, many requests decoded together, as llama-server, vLLM and Ollama do.

One scheduler thread owns the model's batch (a llama.cpp context with one sequence per slot). Each step it
  1. takes queued requests into free slots (the slot that already holds the longest start of the prompt: a chat's
     next turn decodes only its new tokens),
  2. drops requests whose client went away or whose deadline passed, freeing their slots at once,
  3. decodes, in one batch, the next token of every generating request plus chunks of the prompts still being read
     (at most n_batch tokens in all, so a long prompt joins over several steps instead of stalling the streams),
  4. samples each request's token with its own settings and hands it to that request's Decoding (stops, limits).
With --speculate N a greedy request also decodes, after its next token, up to N tokens guessed from its own prompt
and reply, or by a smaller model of the same vocabulary (--draft-model; serve/speculate.py); each drafted position
gets its logits in the same step, the tokens greedy sampling agrees with are kept, one after another until the
first it does not, and the rest leave the slot's cells.
The bounded queue and its 429 are the worker pool's: a request that finds neither a free slot nor a place in the
queue is refused at once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from pathlib import Path

from .backends.base import Backend
from .batch_step import Running, Step
from .job import Decoding, Finish, Job, Waker, admit
from .speculate import Drafter, DraftModel

log = logging.getLogger("serve.batch")


class BatchPool(Step):
    """Same face as pool.WorkerPool (start, submit, close, waiting, busy, workers) over one batched context."""

    def __init__(
        self,
        backend: Backend,
        slots: int = 4,
        max_queue: int = 64,
        on_finish=None,
        prefix_cache: bool = True,
        cache_type: str = "f16",
        speculate: int = 0,
        draft_model: Path | None = None,
    ):
        if slots < 1 or max_queue < 0:
            raise ValueError("slots must be >= 1 and the queue size >= 0")
        self.backend, self.workers, self.max_queue = backend, slots, max_queue
        self.on_finish, self.prefix_cache = on_finish, prefix_cache
        self.cache_type = cache_type  # the KV cache's type (aegis.llamacpp.CACHE_TYPES)
        self.speculate = speculate  # tokens drafted per step for a greedy request (0: none)
        self.draft_model = draft_model  # a GGUF of the same vocabulary that drafts (None: prompt lookup drafts)
        self._draft_model: DraftModel | None = None
        self.waiting = 0  # requests in the queue, not yet in a slot
        self.busy = 0  # slots running a request
        self.steps = self.sequences = 0  # decode calls and the sequences they carried (metrics)
        self.drafted = self.accepted = 0  # tokens drafted by prompt lookup and those greedy decoding kept (metrics)
        # the decode thread's seconds in steps, in llama_decode with its batch and logits, its CPU time there (metrics)
        self.step_s = self.decode_s = self.decode_cpu_s = 0.0
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._batch = None
        self._outbox: list[Job] = []  # jobs with new items this step: the event loop is woken once for them all
        self._waker: Waker | None = None

    def start(self) -> None:
        """Make the batched context (on this thread: a failure is the caller's) and start the scheduler."""
        self._batch = self.backend.new_batch(self.workers, cache_type=self.cache_type)
        self.say_later = getattr(self._batch, "offloaded", False)
        if self.speculate and not self.say_later:
            log.warning(
                "--speculate %d on the CPU: a drafted token costs about a token's compute there, kept or not, so "
                "expect little gain or a loss (BENCHMARKS.md, prompt lookup on one stream); on a GPU it costs next "
                "to nothing beside a step's pass over the weights",
                self.speculate,
            )
        if self.draft_model is not None and self.speculate:
            try:
                self._draft_model = DraftModel(self.backend, self.draft_model, self.workers)
            except BaseException:
                self._batch.close()
                raise
        # After each llama_decode this thread needs the GIL back, and an event loop busy with many streams keeps it
        # until the switch interval ends (5 ms by default, a third of a decode step on a GPU): ask for it sooner.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self._waker = Waker()
        self._thread = threading.Thread(target=self._run, name="model-batch", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            admit(self._closed, self.waiting, self.max_queue, self.workers, self.busy)
            self.waiting += 1
            self._queue.append(job)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        elif self._batch is not None:
            self._batch.close()

    # ---- the scheduler thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        running: dict[int, Running] = {}
        try:
            while True:
                self._wake()  # what the last step (or a finish on the way to it) emitted
                with self._cv:
                    while not self._closed and not self._queue and not running:
                        self._cv.wait()
                    if self._closed:
                        break
                    admitted = self._admit(running)
                for slot, job in admitted:
                    self._start(slot, job, running)
                for slot in [s for s, r in running.items() if r.decoding.interrupted()]:
                    self._finish(slot, running)
                if not running:
                    continue
                t0 = time.perf_counter()
                try:
                    self._step(running)
                except Exception as e:  # noqa: BLE001 - a runtime failure ends the requests in this batch only
                    log.exception("decoding failed")
                    for slot in list(running):
                        self._finish(slot, running, error=f"{type(e).__name__}: {e}")
                    self._batch.forget()
                    if self._draft_model is not None:
                        self._draft_model.forget()
                self.step_s += time.perf_counter() - t0
        finally:
            for slot in list(running):
                self._finish(slot, running, error="the server is shutting down")
            self._wake()
            self._waker.close()
            self._fail_queued("the server is shutting down")
            self._batch.close()
            if self._draft_model is not None:
                self._draft_model.close()

    def _wake(self) -> None:
        if self._outbox:
            self._waker.put(self._outbox.copy())
            self._outbox.clear()  # in place: every running job holds this list

    def _admit(self, running: dict[int, Running]) -> list[tuple[int, Job]]:
        """Queued jobs into free slots (under the lock)."""
        out = []
        free = [i for i in range(self.workers) if i not in running]
        while self._queue and free:
            job = self._queue.popleft()
            job.outbox = self._outbox
            self.waiting -= 1
            slot, keep = self._batch.claim(free, job.prompt, self.prefix_cache)
            if self._draft_model is not None:
                self._draft_model.claim(slot, job.prompt, self.prefix_cache)
            free.remove(slot)
            self.busy += 1
            pending = job.prompt[keep:-1]
            greedy = job.sampling.temperature <= 0 and not job.sampling.grammar  # sampled replies never speculate
            running[slot] = Running(
                job,
                Decoding(self.backend, job),
                pending,
                next_token=None if pending else job.prompt[-1],
                cached=keep,
                drafter=Drafter(job.prompt, self.speculate) if greedy and self.speculate else None,
            )
            out.append((slot, job))
        return out

    def _start(self, slot: int, job: Job, running: dict[int, Running]) -> None:
        try:
            self._batch.start(slot, job.sampling)
        except Exception as e:  # noqa: BLE001 - e.g. a grammar llama.cpp refuses: this request fails, not the rest
            self._finish(slot, running, error=f"{type(e).__name__}: {e}")

    def _finish(self, slot: int, running: dict[int, Running], error: str = "") -> None:
        r = running.pop(slot)
        if r.unsaid is not None and not error:  # its text waited for a step that will not come (see batch_step)
            r.decoding.push(r.unsaid)
        self._batch.release(slot)
        with self._cv:
            self.busy -= 1
        finish = (
            Finish("error", len(r.job.prompt), r.decoding.n, error=error, cached_tokens=r.cached)
            if error
            else r.decoding.finish(cached_tokens=r.cached)
        )
        if self.on_finish is not None:
            try:
                self.on_finish(r.job, finish)
            except Exception:  # noqa: BLE001 - bookkeeping must never take the engine down
                log.exception("on_finish failed")
        r.job.emit(finish)

    def _fail_queued(self, error: str) -> None:
        with self._cv:
            jobs, self._queue = list(self._queue), deque()
            self.waiting = 0
        for job in jobs:
            job.emit(Finish("error", len(job.prompt), 0, error=error))
