"""The OpenAPI document. Litestar writes it from the handlers, but its rendering of request bodies drops some
constraints (a minimum of 0, the bounds of an optional list); the request schemas are replaced here with the ones
msgspec derives from the very types that validate the bodies, so clients and fuzzers see the rules that apply."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin

from .schemas import ChatCompletionRequest, CompletionRequest

REQUEST_TYPES = (ChatCompletionRequest, CompletionRequest)


def exact_components() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(REQUEST_TYPES, ref_template="#/components/schemas/{name}")
    return components


def patch(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(exact_components())
    return document


class ExactJsonRenderPlugin(JsonRenderPlugin):
    """/schema/openapi.json with the request schemas as msgspec states them."""

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        return msgspec.json.encode(patch(dict(openapi_schema)))
