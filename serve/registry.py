"""The served models: loaded on a background thread (so /health answers while weights load), each with its
worker pool; `get` answers 503 until they are ready and 404 for an unknown name."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from aegis import digest

from .backends import Backend, detect, open_backend
from .batch import BatchPool
from .config import ModelSpec, Settings
from .errors import APIError
from .pool import WorkerPool

log = logging.getLogger("serve")
DEFAULT_SLOTS = 4  # requests a llama.cpp model decodes together unless --parallel says otherwise (llama-server's too)


def verify_files(specs: list[ModelSpec]) -> None:
    """Checks each GGUF against the NAME.gguf.sha256 export wrote beside it, before anything is loaded: a damaged or
    swapped file is refused, not served. Raises DigestError (its message names the file and --no-verify)."""
    for spec in specs:
        if (spec.backend if spec.backend != "auto" else detect(spec.path)) != "llamacpp":
            continue  # a model directory: its weights are transformers' to check
        started = time.monotonic()
        try:
            digest.verify(spec.path)
        except digest.DigestError as e:
            if not digest.sidecar(spec.path).is_file():
                raise  # no record: the message already says what --no-verify is for
            raise digest.DigestError(f"{e}; --no-verify serves it unchecked") from None
        log.info("%s matches %s (%.1fs)", spec.path, digest.sidecar(spec.path).name, time.monotonic() - started)


@dataclass
class ServedModel:
    spec: ModelSpec
    backend: Backend
    pool: WorkerPool | BatchPool
    created: int

    @property
    def name(self) -> str:
        return self.spec.name


class Registry:
    """The served models. Loading runs on a background thread so /health answers while weights load."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        self.error: str | None = None
        self._closed = False
        self._lock = threading.Lock()
        self.on_finish = None  # on_finish(model_name, job, finish), from the worker thread

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.settings.models]

    def load_all(self) -> None:
        s = self.settings
        # the settings each runtime reads: llama.cpp's for a GGUF, transformers' for a model directory
        llama_cpp = dict(threads=s.threads, batch_size=s.batch_size, gpu_layers=s.n_gpu_layers)
        transformers = dict(device=s.device, dtype=s.dtype, quantization=s.quantization)
        try:
            for spec in s.models:
                started = time.monotonic()
                backend = open_backend(spec.path, spec.backend, n_ctx=s.ctx_size, **llama_cpp, **transformers)
                hook = self._finished_hook(spec.name)
                if backend.batched:
                    pool = BatchPool(
                        backend,
                        slots=s.parallel or DEFAULT_SLOTS,
                        max_queue=s.queue_size,
                        on_finish=hook,
                        prefix_cache=s.prefix_cache == "on",
                        cache_type=s.cache_type,
                        speculate=s.speculate,
                        draft_model=s.draft_model,
                    )
                else:
                    pool = WorkerPool(backend, workers=s.parallel or 1, max_queue=s.queue_size, on_finish=hook)
                pool.start()
                with self._lock:
                    if self._closed:  # shut down while loading
                        pool.close()
                        return
                    self.models[spec.name] = ServedModel(spec, backend, pool, int(time.time()))
                log.info(
                    "model %s ready (%s, context %d, %d %s) in %.1fs",
                    spec.name,
                    backend.kind,
                    backend.context_length,
                    pool.workers,
                    "slots in one batch" if backend.batched else "worker(s)",
                    time.monotonic() - started,
                )
            self.ready = True
        except Exception as e:  # noqa: BLE001 - reported through /health and the log; the CLI exits
            self.error = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", self.error)
            raise

    def _finished_hook(self, name: str):
        def hook(job, finish):
            if self.on_finish is not None:
                self.on_finish(name, job, finish)

        return hook

    def get(self, name: str | None) -> ServedModel:
        if not self.ready:
            msg = f"the model failed to load: {self.error}" if self.error else "the model is still loading"
            raise APIError(503, msg, headers={"Retry-After": "5"})
        key = name if name is not None else self.names[0]
        model = self.models.get(key)
        if model is None:
            raise APIError(
                404,
                f"the model {key!r} does not exist; this server has: {', '.join(self.names)}",
                param="model",
                code="model_not_found",
            )
        return model

    def close(self) -> None:
        with self._lock:
            self._closed = True
            models, self.models = list(self.models.values()), {}
        self.ready = False
        for m in models:
            m.pool.close()
            m.backend.close()
