"""The Litestar app: OpenAI-compatible routes over the served models, health, readiness, metrics, OpenAPI.

The routes know nothing about which backend runs a model: they validate, build the prompt (engine.py), queue a job
(pool.py) and turn its text back into OpenAI's JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import msgspec
from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme
from litestar.response import Stream

from . import __doc__ as package_doc
from . import engine
from .config import Settings
from .errors import HANDLERS, APIError
from .metrics import Metrics
from .openapi import ExactJsonRenderPlugin
from .pool import Finish, Job
from .schemas import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, Completion,
                      CompletionChoice, CompletionRequest, ErrorResponse, Health, ModelCard, ModelList, Usage)

log = logging.getLogger("serve")
VERSION = "0.1.0"

ERRORS = {code: ResponseSpec(ErrorResponse, description=text) for code, text in (
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
    (413, "request body too large"), (429, "queue full"), (503, "model not ready"), (504, "request timed out"))}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _usage(finish: Finish) -> Usage:
    return Usage(finish.prompt_tokens, finish.completion_tokens, finish.prompt_tokens + finish.completion_tokens)


def _sse(payload) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def _raise_for(finish: Finish) -> None:
    if finish.reason == "timeout":
        raise APIError(504, "the request did not finish within the server's timeout")
    if finish.reason == "error":
        raise APIError(500, f"generation failed: {finish.error}", code="generation_failed")


def create_app(settings: Settings, registry: engine.Registry | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> Litestar:
    registry = registry or engine.Registry(settings)
    metrics = Metrics()
    expected_key = settings.api_key.encode() if settings.api_key else None

    def v1_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if expected_key is None:
            return
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected_key):
            raise APIError(401, "missing or incorrect API key (send Authorization: Bearer KEY)")

    # ---- generation -----------------------------------------------------------------------------------------

    async def watch_disconnect(request: Request, job: Job) -> None:
        # the body has been read, so the next ASGI message is the disconnect: a client that gives up on a
        # non-streamed request frees its worker too
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    async def collect(request: Request, job: Job) -> str:
        parts = []
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            async for pieces in job.events():
                parts.extend(pieces)
        except TimeoutError:
            raise APIError(504, "the request did not finish within the server's timeout") from None
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once finished
        _raise_for(job.finish)
        return "".join(parts)

    def record(name: str, job: Job, finish: Finish) -> None:
        ttft = None if job.first_text is None else job.first_text - job.submitted
        metrics.record_generation(name, finish, ttft)

    registry.on_finish = record

    async def stream(p: engine.Prepared, job: Job, make_chunk, first_chunk=None) -> AsyncIterator[bytes]:
        try:
            if first_chunk is not None:
                yield _sse(first_chunk)
            try:
                async for pieces in job.events():
                    # one event per piece, as OpenAI sends them, but one write for all that arrived together
                    yield b"".join(_sse(make_chunk(text, None)) for text in pieces)
                _raise_for(job.finish)
            except (TimeoutError, APIError) as e:  # headers are gone: the error travels as an event, as OpenAI does
                err = e if isinstance(e, APIError) else APIError(504, "the request did not finish within the "
                                                                      "server's timeout")
                yield _sse(err.body())
                yield b"data: [DONE]\n\n"
                return
            yield _sse(make_chunk(None, job.finish.reason))
            if p.include_usage:
                yield _sse(make_chunk(None, None, usage=_usage(job.finish)))
            yield b"data: [DONE]\n\n"
        finally:
            # the client went away (the stream was cancelled) or we are done: the worker stops at its next token
            job.cancel()

    # ---- routes ---------------------------------------------------------------------------------------------

    @post("/v1/chat/completions", guards=[v1_guard], status_code=200, tags=["openai"],
          responses={200: ResponseSpec(ChatCompletion, description="a completion, or server-sent events when "
                                                                   "stream is true"), **ERRORS})
    async def chat_completions(data: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion with the model's own chat template."""
        p = engine.prepare_chat(registry, data)
        job = engine.submit(p, settings.timeout)
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), p.model.name
        if p.stream:
            def chunk(text, finish_reason, usage=None):
                delta = {} if text is None else {"content": text}
                return _chunk_body(rid, "chat.completion.chunk", created, name, {
                    "index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}, usage)

            first_chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                           "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
            return Stream(stream(p, job, chunk, first_chunk), media_type="text/event-stream", headers=SSE_HEADERS)
        text = await collect(request, job)
        body = ChatCompletion(rid, created, name, [ChatChoice(0, AssistantMessage("assistant", text),
                                                              job.finish.reason)], _usage(job.finish))
        return Response(body, media_type=MediaType.JSON)

    @post("/v1/completions", guards=[v1_guard], status_code=200, tags=["openai"],
          responses={200: ResponseSpec(Completion, description="a completion, or server-sent events when stream "
                                                               "is true"), **ERRORS})
    async def completions(data: CompletionRequest, request: Request) -> Response:
        """Plain text completion of a prompt (no chat template)."""
        p = engine.prepare_completion(registry, data)
        job = engine.submit(p, settings.timeout)
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), p.model.name
        if p.stream:
            def chunk(text, finish_reason, usage=None):
                return _chunk_body(rid, "text_completion", created, name, {
                    "index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}, usage)

            return Stream(stream(p, job, chunk), media_type="text/event-stream", headers=SSE_HEADERS)
        text = await collect(request, job)
        body = Completion(rid, created, name, [CompletionChoice(0, text, job.finish.reason)], _usage(job.finish))
        return Response(body, media_type=MediaType.JSON)

    def card(m: engine.ServedModel) -> ModelCard:
        return ModelCard(m.name, m.created, "aegis", m.backend.context_length, m.backend.kind)

    @get("/v1/models", guards=[v1_guard], tags=["openai"], responses=ERRORS)
    async def list_models() -> ModelList:
        """The served models."""
        registry.get(None)  # 503 until loaded
        return ModelList([card(m) for m in registry.models.values()])

    @get("/v1/models/{model_id:path}", guards=[v1_guard], tags=["openai"], responses=ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        """One served model."""
        return card(registry.get(model_id.lstrip("/")))

    @get("/health", tags=["ops"])
    async def health() -> Health:
        """Liveness: the process answers (ready tells whether the models are loaded)."""
        return Health("ok", registry.ready, registry.names, registry.error)

    @get("/ready", tags=["ops"], responses={503: ResponseSpec(ErrorResponse, description="not ready")})
    async def ready() -> Health:
        """Readiness: 200 once every model is loaded, 503 before."""
        registry.get(None)
        return Health("ready", True, registry.names)

    @get("/metrics", tags=["ops"], media_type=metrics.content_type)
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=metrics.content_type)

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def load() -> None:
        try:
            registry.load_all()
            for m in registry.models.values():
                metrics.watch_pool(m.name, m.pool)
        except Exception as e:  # noqa: BLE001 - Registry recorded it; the CLI decides what a failure means
            if on_load_error is not None:
                on_load_error(e)

    def on_startup() -> None:
        threading.Thread(target=load, name="model-loader", daemon=True).start()

    security = {}
    components = Components()
    if expected_key is not None:
        components = Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")})
        security = {"security": [{"bearer": []}]}
    openapi = OpenAPIConfig(title="AEGIS API", version=VERSION, description=package_doc, components=components,
                            render_plugins=[ExactJsonRenderPlugin()], path="/schema", **security)

    app = Litestar(
        route_handlers=[chat_completions, completions, list_models, get_model, health, ready, prometheus],
        exception_handlers=HANDLERS, request_max_body_size=settings.max_body_bytes, openapi_config=openapi,
        middleware=[metrics.middleware], on_startup=[on_startup], on_shutdown=[registry.close], debug=False,
        logging_config=None)
    app.state.registry = registry
    app.state.metrics = metrics
    return app


def _chunk_body(rid: str, obj: str, created: int, model: str, choice: dict, usage=None) -> dict:
    """One streamed event: a choice, or (the last one, with stream_options.include_usage) the usage alone."""
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [] if usage else [choice]}
    if usage:
        body["usage"] = msgspec.to_builtins(usage)
    return body
