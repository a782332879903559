"""From a decoded request to a job ready to queue: the prompt (the model's own chat template), the grammar that
constrains the reply (response_format, tools: serve/constraints.py), the token budget against the context, and every
check a type cannot express. Everything here raises APIError with the client's status (400/404/429/503); nothing a
client sends reaches a backend unchecked, and every field it sends is honoured or refused by name."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aegis.chat_template import TemplateError

from . import constraints, prompt
from .backends import Backend, Sampling
from .config import Settings
from .constraints import unsupported
from .errors import APIError, bad_request
from .job import Job, PoolClosed, QueueFull
from .registry import Registry, ServedModel
from .schemas import ChatCompletionRequest, CompletionRequest, JsonSchemaFormat, SamplingRequest

log = logging.getLogger("serve")


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
    logprobs: int | None = None  # None: no log-probabilities; else alternatives per token
    tools: bool = False  # the reply is read for tool calls


def _check_common(req: SamplingRequest) -> None:
    if req.n not in (None, 1):
        raise unsupported("n > 1 is not supported: send one request per completion", "n")
    if req.logit_bias:
        raise unsupported("logit_bias is not supported by this server", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if req.user:
        log.debug("request for user %r", req.user)


def _stops(stop) -> list[str]:
    # an empty stop string would match everywhere; "" alone (some clients send it for "none") means no stop
    return [s for s in ([stop] if isinstance(stop, str) else list(stop or [])) if s]


def _sampling(req: SamplingRequest, grammar: tuple[str, object] | None = None) -> Sampling:
    return Sampling(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        grammar=grammar[0] if grammar else None,
        compiled=grammar[1] if grammar else None,
    )


def budget(
    backend: Backend,
    prompt_len: int,
    requested: int | None,
    default: int,
    param: str,
    prompt_param: str,
    settings: Settings,
) -> int:
    """max_tokens for the job: as requested if prompt + max_tokens fits the context, else a 400."""
    n_ctx = backend.context_length
    if prompt_len >= n_ctx:
        raise bad_request(
            f"the prompt is {prompt_len} tokens; this model's context is {n_ctx}",
            prompt_param,
            "context_length_exceeded",
        )
    room = n_ctx - prompt_len
    if requested is not None:
        if requested > room:
            raise bad_request(
                f"max_tokens {requested} is beyond the context: the prompt takes {prompt_len} of "
                f"{n_ctx} tokens, leaving {room}",
                param,
                "context_length_exceeded",
            )
        return requested
    if default:
        return min(default, room)
    return min(settings.max_tokens_default, room) if settings.max_tokens_default else room


def prepare_chat(registry: Registry, req: ChatCompletionRequest) -> Prepared:
    model = registry.get(req.model)
    backend = model.backend
    _check_common(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    choice, defs = constraints.tool_plan(req)
    grammar = constraints.grammar(backend, req, choice, defs)
    if not backend.chat_template:
        raise bad_request("this model has no chat template; use /v1/completions", "messages", "no_chat_template")
    # what the system turn gets besides the conversation's own: the tools on offer, or what the JSON reply is for
    # (the two never come together: a JSON response_format needs tool_choice none)
    fmt = req.response_format
    note = (
        backend.tool_format.system_text(defs)
        if choice != "none"
        else fmt.json_schema.description
        if isinstance(fmt, JsonSchemaFormat)
        else None
    )
    messages = prompt.conversation(req.messages, backend.chat_template, note)
    try:
        ids = prompt.chat_ids(backend, messages)
    except TemplateError as e:
        raise bad_request(str(e), "messages", "chat_template_rejected") from e
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = budget(backend, len(ids), requested, 0, param, "messages", registry.settings)
    return Prepared(
        model,
        ids,
        max_tokens,
        _stops(req.stop),
        _sampling(req, grammar),
        bool(req.stream),
        bool(req.stream_options and req.stream_options.include_usage),
        req.ignore_eos,
        (req.top_logprobs or 0) if req.logprobs else None,
        choice != "none",
    )


def completion_prompt(backend: Backend, prompt_value, parse_special: bool) -> list[int]:
    def tokenize(text: str) -> list[int]:
        return backend.tokenize(text, add_special=backend.add_bos, parse_special=parse_special)

    if isinstance(prompt_value, str):
        ids = tokenize(prompt_value)
    elif all(isinstance(p, int) and not isinstance(p, bool) for p in prompt_value):
        bad = next((p for p in prompt_value if not 0 <= p < backend.vocab_size), None)
        if bad is not None:
            raise bad_request(
                f"token id {bad} is outside the vocabulary (0..{backend.vocab_size - 1})", "prompt", "invalid_token"
            )
        ids = list(prompt_value)
    elif len(prompt_value) == 1 and isinstance(prompt_value[0], str):
        ids = tokenize(prompt_value[0])
    elif all(isinstance(p, str) for p in prompt_value):
        raise unsupported("batched prompts are not supported: send one prompt per request", "prompt")
    else:
        raise bad_request("prompt must be a string, a list of one string, or a list of token ids", "prompt")
    if not ids:
        raise bad_request("the prompt is empty", "prompt")
    return ids


def prepare_completion(registry: Registry, req: CompletionRequest) -> Prepared:
    model = registry.get(req.model)
    _check_common(req)
    if req.best_of not in (None, 1):
        raise unsupported("best_of > 1 is not supported", "best_of")
    if req.echo:
        raise unsupported("echo is not supported by this server", "echo")
    if req.suffix:
        raise unsupported("suffix (insertion) is not supported by this server", "suffix")
    ids = completion_prompt(model.backend, req.prompt, req.parse_special)
    # OpenAI's legacy completions default to 16 tokens
    max_tokens = budget(model.backend, len(ids), req.max_tokens, 16, "max_tokens", "prompt", registry.settings)
    return Prepared(
        model,
        ids,
        max_tokens,
        _stops(req.stop),
        _sampling(req),
        bool(req.stream),
        bool(req.stream_options and req.stream_options.include_usage),
        req.ignore_eos,
        req.logprobs,
    )


def submit(p: Prepared, timeout: float) -> Job:
    job = Job(
        prompt=p.prompt,
        sampling=p.sampling,
        max_tokens=p.max_tokens,
        stops=p.stops,
        timeout=timeout,
        loop=asyncio.get_running_loop(),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
    )
    try:
        p.model.pool.submit(job)
    except QueueFull as e:
        raise APIError(429, f"{e}; retry later", code="queue_full", headers={"Retry-After": "1"}) from e
    except PoolClosed as e:
        raise APIError(503, str(e), code="shutting_down") from e
    return job
