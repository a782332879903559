"""The Litestar app: OpenAI-compatible routes over the served models, health, readiness, metrics, OpenAPI.

The routes live at module level and get the server's state (settings, registry, metrics) through the `service`
dependency. They know nothing about which backend runs a model: they decode the body strictly (schemas.decode),
prepare the job (engine.py) and hand it to the one request path (request_path.respond).
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from litestar import Litestar, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme

from . import __doc__ as package_doc, engine
from .config import Settings
from .errors import HANDLERS, APIError, BodyTimeout, ClientGone, shutting_down
from .job import Finish, Job
from .metrics import Metrics
from .openapi import ExactJsonRenderPlugin
from .registry import Registry, ServedModel
from .replies import ChatReply, TextReply
from .request_path import cut_off, respond
from .responses import ChatCompletion, Completion, ErrorResponse, Health, ModelCard, ModelList
from .schemas import ChatCompletionRequest, CompletionRequest, decode

VERSION = "0.1.0"
ERRORS = {
    code: ResponseSpec(ErrorResponse, description=text)
    for code, text in (
        (400, "invalid request"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (408, "request body too slow"),
        (413, "request body too large"),
        (429, "queue full"),
        (503, "model not ready, or the server is shutting down"),
        (504, "request timed out"),
    )
}


@dataclass
class Service:
    """What the routes share: the settings, the served models and the metrics; draining once the server was told to
    stop (serve/server.py sets it): /ready and new requests answer 503 while the requests in flight finish."""

    settings: Settings
    registry: Registry
    metrics: Metrics
    draining: bool = False


def service(state: State) -> Service:
    return state.service


def api_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    key = connection.app.state.service.settings.api_key
    if not key:
        return
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or incorrect API key (send Authorization: Bearer KEY)")


def accepting_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """New API requests are refused while the server drains (a balancer retries them on another replica)."""
    if connection.app.state.service.draining:
        raise shutting_down()


def body_guard(timeout: float):
    """ASGI middleware over the request body as the routes read it: the whole body must arrive within `timeout`
    seconds (BodyTimeout: 408), and a client that disconnects before it has sent all of it raises ClientGone (a
    client event, counted as 499) instead of Litestar's 500 "client disconnected prematurely". Here rather than in
    the protocol (serve/server.py) because only here can the answer still be the API's own JSON."""

    def middleware(app):
        async def guarded(scope, receive, send):
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            deadline, complete = time.monotonic() + timeout, False

            async def watched():
                nonlocal complete
                if complete:  # after the body only the disconnect can come, whenever it comes
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    raise BodyTimeout(f"did not arrive in full within {timeout:g} s") from None
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                complete = not message.get("more_body", False)
                return message

            await app(scope, watched, send)

        return guarded

    return middleware


# ---- generation -------------------------------------------------------------------------------------------------


def _completion_route(path: str, answer: type) -> post:
    """The route of a completion endpoint: behind the API's guards, answering `answer` (server-sent events when the
    request streams) or one of ERRORS."""
    return post(
        path,
        guards=[accepting_guard, api_key_guard],
        status_code=200,
        tags=["openai"],
        responses={
            200: ResponseSpec(answer, description="a completion, or server-sent events when stream is true"),
            **ERRORS,
        },
    )


async def _generate(request: Request, service: Service, kind, prepare, reply) -> Response:
    """Both completion endpoints: decode strictly, prepare, then the one request path."""
    body = await request.body()
    # preparing builds the request's grammar (a big schema takes a while): on a thread, never on the event loop
    p = await asyncio.to_thread(lambda: prepare(service.registry, decode(body, kind)))
    return await respond(request, p, reply(p), service.settings.timeout)


@_completion_route("/v1/chat/completions", ChatCompletion)
async def chat_completions(request: Request, service: Service) -> Response:
    """Chat completion with the model's own chat template (body: ChatCompletionRequest)."""
    return await _generate(request, service, ChatCompletionRequest, engine.prepare_chat, ChatReply)


@_completion_route("/v1/completions", Completion)
async def completions(request: Request, service: Service) -> Response:
    """Plain text completion of a prompt, no chat template (body: CompletionRequest)."""
    return await _generate(request, service, CompletionRequest, engine.prepare_completion, TextReply)


# ---- models and operations --------------------------------------------------------------------------------------


def _card(m: ServedModel) -> ModelCard:
    return ModelCard(m.name, m.created, "aegis", m.backend.context_length, m.backend.kind)


@get("/v1/models", guards=[accepting_guard, api_key_guard], tags=["openai"], responses=ERRORS)
async def list_models(service: Service) -> ModelList:
    """The served models."""
    service.registry.get(None)  # 503 until loaded
    return ModelList([_card(m) for m in service.registry.models.values()])


@get("/v1/models/{model_id:path}", guards=[accepting_guard, api_key_guard], tags=["openai"], responses=ERRORS)
async def get_model(model_id: str, service: Service) -> ModelCard:
    """One served model."""
    return _card(service.registry.get(model_id.lstrip("/")))


@get("/health", tags=["ops"])
async def health(service: Service) -> Health:
    """Liveness: the process answers (ready tells whether the models are loaded and the server is not stopping)."""
    r = service.registry
    return Health("shutting_down" if service.draining else "ok", r.ready and not service.draining, r.names, r.error)


@get("/ready", tags=["ops"], responses={503: ResponseSpec(ErrorResponse, description="not ready")})
async def ready(service: Service) -> Health:
    """Readiness: 200 once every model is loaded, 503 before and from the moment the server is told to stop."""
    if service.draining:
        raise shutting_down()
    service.registry.get(None)
    return Health("ready", True, service.registry.names)


@get("/metrics", tags=["ops"], media_type=Metrics.content_type)
async def prometheus(service: Service) -> Response:
    """Prometheus text format."""
    return Response(service.metrics.render(), media_type=Metrics.content_type)


ROUTES = [chat_completions, completions, list_models, get_model, health, ready, prometheus]


# ---- the app ----------------------------------------------------------------------------------------------------


def create_app(
    settings: Settings, registry: Registry | None = None, on_load_error: Callable[[BaseException], None] | None = None
) -> Litestar:
    registry = registry or Registry(settings)
    metrics = Metrics()

    def record(name: str, job: Job, finish: Finish) -> None:
        ttft = None if job.first_text is None else job.first_text - job.submitted
        metrics.record_generation(name, finish, ttft)

    registry.on_finish = record

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
    if settings.api_key:
        components = Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")})
        security = {"security": [{"bearer": []}]}
    openapi = OpenAPIConfig(
        title="AEGIS API",
        version=VERSION,
        description=package_doc,
        components=components,
        render_plugins=[ExactJsonRenderPlugin()],
        path="/schema",
        **security,
    )
    svc = Service(settings, registry, metrics)
    # outermost first: the metrics see every status, the cut-off ending included
    middleware = [metrics.middleware, lambda app: cut_off(app, lambda: svc.draining), body_guard(settings.body_timeout)]
    app = Litestar(
        route_handlers=ROUTES,
        dependencies={"service": Provide(service, sync_to_thread=False)},
        exception_handlers=HANDLERS,
        request_max_body_size=settings.max_body,
        openapi_config=openapi,
        middleware=middleware,
        on_startup=[on_startup],
        on_shutdown=[registry.close],
        debug=False,
        logging_config=None,
    )
    app.state.service = svc
    return app
