"""From a validated request to a queued job: the served models, prompt building with the model's own chat template,
the token budget against the context, and the checks a schema cannot express. Everything here raises APIError
with the client's status (400/404/429/503); nothing a client sends reaches a backend unchecked."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from aegis.chat_template import TemplateError

from . import prompt
from .backends import Backend, Sampling, open_backend
from .config import ModelSpec, Settings
from .errors import APIError, bad_request
from .pool import Job, PoolClosed, QueueFull, WorkerPool
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest

log = logging.getLogger("serve")


@dataclass
class ServedModel:
    spec: ModelSpec
    backend: Backend
    pool: WorkerPool
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
        try:
            for spec in s.models:
                started = time.monotonic()
                backend = open_backend(spec.path, spec.backend, n_ctx=s.ctx_size, workers=s.workers,
                                       threads=s.threads, gpu_layers=s.gpu_layers, device=s.device, dtype=s.dtype,
                                       quantization=s.quantization)
                pool = WorkerPool(backend, workers=s.workers, max_queue=s.queue_size,
                                  on_finish=self._finished_hook(spec.name))
                pool.start()
                with self._lock:
                    if self._closed:  # shut down while loading
                        pool.close()
                        return
                    self.models[spec.name] = ServedModel(spec, backend, pool, int(time.time()))
                log.info("model %s ready (%s, context %d, %d worker(s)) in %.1fs", spec.name, backend.kind,
                         backend.context_length, s.workers, time.monotonic() - started)
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
            raise APIError(404, f"the model {key!r} does not exist; this server has: {', '.join(self.names)}",
                           param="model", code="model_not_found")
        return model

    def close(self) -> None:
        with self._lock:
            self._closed = True
            models, self.models = list(self.models.values()), {}
        self.ready = False
        for m in models:
            m.pool.close()
            m.backend.close()


# ---- request checks ---------------------------------------------------------------------------------------------

def _stops(stop) -> list[str]:
    # an empty stop string would match everywhere; "" alone (some clients send it for "none") means no stop
    return [s for s in ([stop] if isinstance(stop, str) else list(stop or [])) if s]


def _sampling(req: SamplingRequest) -> Sampling:
    return Sampling(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed)


def _check_unsupported(req: SamplingRequest) -> None:
    if req.n not in (None, 1):
        raise bad_request("n > 1 is not supported: ask once per completion", "n", "unsupported_parameter")
    if getattr(req, "best_of", None) not in (None, 1):
        raise bad_request("best_of > 1 is not supported", "best_of", "unsupported_parameter")
    if getattr(req, "tools", None):
        raise bad_request("tools are not supported by this server", "tools", "unsupported_parameter")
    logprobs = getattr(req, "logprobs", None)
    if logprobs:
        raise bad_request("logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    if getattr(req, "echo", None):
        raise bad_request("echo is not supported by this server", "echo", "unsupported_parameter")
    if getattr(req, "suffix", None):
        raise bad_request("suffix (insertion) is not supported by this server", "suffix", "unsupported_parameter")


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    """Messages as plain dicts for the template: text parts joined, `developer` read as `system`."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):  # text parts (the schema admits no other kind)
            content = "".join(part.text for part in content)
        if content is None:
            raise bad_request("a message needs content", f"messages[{i}].content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def chat_prompt(backend: Backend, messages: list[dict]) -> list[int]:
    if not backend.chat_template:
        raise bad_request("this model has no chat template; use /v1/completions", "messages", "no_chat_template")
    try:
        return prompt.chat_ids(backend, messages)
    except TemplateError as e:
        raise bad_request(str(e), "messages", "chat_template_rejected") from e


def completion_prompt(backend: Backend, prompt) -> list[int]:
    if isinstance(prompt, str):
        ids = backend.tokenize(prompt, add_special=backend.add_bos)
    elif all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        bad = next((p for p in prompt if not 0 <= p < backend.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (0..{backend.vocab_size - 1})", "prompt",
                              "invalid_token")
        ids = list(prompt)
    elif len(prompt) == 1 and isinstance(prompt[0], str):
        ids = backend.tokenize(prompt[0], add_special=backend.add_bos)
    elif all(isinstance(p, str) for p in prompt):
        raise bad_request("batched prompts are not supported: send one prompt per request", "prompt",
                          "unsupported_parameter")
    else:
        raise bad_request("prompt must be a string, a list of one string, or a list of token ids", "prompt")
    if not ids:
        raise bad_request("the prompt is empty", "prompt")
    return ids


def budget(backend: Backend, prompt_len: int, requested: int | None, default: int, param: str,
           prompt_param: str, settings: Settings) -> int:
    """max_tokens for the job: as requested if prompt + max_tokens fits the context, else a 400."""
    n_ctx = backend.context_length
    if prompt_len >= n_ctx:
        raise bad_request(f"the prompt is {prompt_len} tokens; this model's context is {n_ctx}",
                          prompt_param, "context_length_exceeded")
    room = n_ctx - prompt_len
    if requested is not None:
        if requested > room:
            raise bad_request(f"max_tokens {requested} is beyond the context: the prompt takes {prompt_len} of "
                              f"{n_ctx} tokens, leaving {room}", param, "context_length_exceeded")
        return requested
    if default:
        return min(default, room)
    return min(settings.default_max_tokens, room) if settings.default_max_tokens else room


@dataclass
class Prepared:
    model: ServedModel
    prompt: list[int]
    max_tokens: int
    stops: list[str]
    sampling: Sampling
    stream: bool
    include_usage: bool
    ignore_eos: bool = False


def prepare_chat(registry: Registry, req: ChatCompletionRequest) -> Prepared:
    model = registry.get(req.model)
    _check_unsupported(req)
    stops, sampling = _stops(req.stop), _sampling(req)
    messages = chat_messages(req)
    prompt = chat_prompt(model.backend, messages)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = budget(model.backend, len(prompt), requested, 0, param, "messages", registry.settings)
    return Prepared(model, prompt, max_tokens, stops, sampling, bool(req.stream),
                    bool(req.stream_options and req.stream_options.include_usage), bool(req.ignore_eos))


def prepare_completion(registry: Registry, req: CompletionRequest) -> Prepared:
    model = registry.get(req.model)
    _check_unsupported(req)
    stops, sampling = _stops(req.stop), _sampling(req)
    prompt = completion_prompt(model.backend, req.prompt)
    # OpenAI's legacy completions default to 16 tokens
    max_tokens = budget(model.backend, len(prompt), req.max_tokens, 16, "max_tokens", "prompt",
                        registry.settings)
    return Prepared(model, prompt, max_tokens, stops, sampling, bool(req.stream),
                    bool(req.stream_options and req.stream_options.include_usage), bool(req.ignore_eos))


def submit(p: Prepared, timeout: float) -> Job:
    job = Job(prompt=p.prompt, sampling=p.sampling, max_tokens=p.max_tokens, stops=p.stops, timeout=timeout,
              loop=asyncio.get_running_loop(), ignore_eos=p.ignore_eos)
    try:
        p.model.pool.submit(job)
    except QueueFull as e:
        raise APIError(429, f"{e}; retry later", code="queue_full", headers={"Retry-After": "1"}) from e
    except PoolClosed as e:
        raise APIError(503, str(e), code="shutting_down") from e
    return job
