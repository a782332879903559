"""The Litestar app: OpenAI-compatible routes over the served models, health, readiness, metrics, OpenAPI.

The routes live at module level and get the server's state (settings, registry, metrics) through the `service`
dependency. They know nothing about which backend runs a model: they decode the body strictly (schemas.decode),
prepare the job (engine.py) and hand it to the one request path (replies.respond).
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from dataclasses import dataclass

from litestar import Litestar, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme

from . import __doc__ as package_doc
from . import engine
from .config import Settings
from .errors import HANDLERS, APIError
from .metrics import Metrics
from .openapi import ExactJsonRenderPlugin
from .job import Finish, Job
from .registry import Registry, ServedModel
from .replies import ChatReply, TextReply, respond
from .responses import ChatCompletion, Completion, ErrorResponse, Health, ModelCard, ModelList
from .schemas import ChatCompletionRequest, CompletionRequest, decode

VERSION = "0.1.0"
ERRORS = {code: ResponseSpec(ErrorResponse, description=text) for code, text in (
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
    (413, "request body too large"), (429, "queue full"), (503, "model not ready"), (504, "request timed out"))}


@dataclass
class Service:
    """What the routes share: the settings, the served models and the metrics."""
    settings: Settings
    registry: Registry
    metrics: Metrics


def service(state: State) -> Service:
    return state.service


def api_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    key = connection.app.state.service.settings.api_key
    if not key:
        return
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or incorrect API key (send Authorization: Bearer KEY)")


# ---- generation -------------------------------------------------------------------------------------------------

async def _generate(request: Request, service: Service, kind, prepare, reply) -> Response:
    """Both completion endpoints: decode strictly, prepare, then the one request path."""
    p = prepare(service.registry, decode(await request.body(), kind))
    return await respond(request, p, reply(p), service.settings.timeout)


@post("/v1/chat/completions", guards=[api_key_guard], status_code=200, tags=["openai"],
      responses={200: ResponseSpec(ChatCompletion, description="a completion, or server-sent events when stream is "
                                                               "true"), **ERRORS})
async def chat_completions(request: Request, service: Service) -> Response:
    """Chat completion with the model's own chat template (body: ChatCompletionRequest)."""
    return await _generate(request, service, ChatCompletionRequest, engine.prepare_chat, ChatReply)


@post("/v1/completions", guards=[api_key_guard], status_code=200, tags=["openai"],
      responses={200: ResponseSpec(Completion, description="a completion, or server-sent events when stream is "
                                                           "true"), **ERRORS})
async def completions(request: Request, service: Service) -> Response:
    """Plain text completion of a prompt, no chat template (body: CompletionRequest)."""
    return await _generate(request, service, CompletionRequest, engine.prepare_completion, TextReply)


# ---- models and operations --------------------------------------------------------------------------------------

def _card(m: ServedModel) -> ModelCard:
    return ModelCard(m.name, m.created, "aegis", m.backend.context_length, m.backend.kind)


@get("/v1/models", guards=[api_key_guard], tags=["openai"], responses=ERRORS)
async def list_models(service: Service) -> ModelList:
    """The served models."""
    service.registry.get(None)  # 503 until loaded
    return ModelList([_card(m) for m in service.registry.models.values()])


@get("/v1/models/{model_id:path}", guards=[api_key_guard], tags=["openai"], responses=ERRORS)
async def get_model(model_id: str, service: Service) -> ModelCard:
    """One served model."""
    return _card(service.registry.get(model_id.lstrip("/")))


@get("/health", tags=["ops"])
async def health(service: Service) -> Health:
    """Liveness: the process answers (ready tells whether the models are loaded)."""
    r = service.registry
    return Health("ok", r.ready, r.names, r.error)


@get("/ready", tags=["ops"], responses={503: ResponseSpec(ErrorResponse, description="not ready")})
async def ready(service: Service) -> Health:
    """Readiness: 200 once every model is loaded, 503 before."""
    service.registry.get(None)
    return Health("ready", True, service.registry.names)


@get("/metrics", tags=["ops"], media_type=Metrics.content_type)
async def prometheus(service: Service) -> Response:
    """Prometheus text format."""
    return Response(service.metrics.render(), media_type=Metrics.content_type)


ROUTES = [chat_completions, completions, list_models, get_model, health, ready, prometheus]


# ---- the app ----------------------------------------------------------------------------------------------------

def create_app(settings: Settings, registry: Registry | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> Litestar:
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
    openapi = OpenAPIConfig(title="AEGIS API", version=VERSION, description=package_doc, components=components,
                            render_plugins=[ExactJsonRenderPlugin()], path="/schema", **security)
    app = Litestar(route_handlers=ROUTES, dependencies={"service": Provide(service, sync_to_thread=False)},
                   exception_handlers=HANDLERS, request_max_body_size=settings.max_body, openapi_config=openapi,
                   middleware=[metrics.middleware], on_startup=[on_startup], on_shutdown=[registry.close],
                   debug=False, logging_config=None)
    app.state.service = Service(settings, registry, metrics)
    return app
