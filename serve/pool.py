"""A fixed pool of model workers behind a bounded queue, for runtimes that decode one request per worker
(transformers; llama.cpp models are served by serve.batch instead).

Each worker thread owns one `Session` and runs one job at a time. A job that cannot get a place in the queue is
refused at once (the API answers 429) rather than piling up. The worker checks the job's cancel flag and deadline at
every token, so a client that goes away, or a job past its timeout, frees the worker at the next token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from .backends.base import Backend
from .job import Decoding, Finish, Job, admit

log = logging.getLogger("serve.pool")


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
            admit(self._closed, self.waiting, self.max_queue, self.workers, self.busy)
            self.waiting += 1
        self._queue.put(job)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)
