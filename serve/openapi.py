"""The OpenAPI document. Litestar writes it from the handlers; the request bodies, which the handlers decode
themselves (strictly, see schemas.decode), are added here with the schemas msgspec derives from the very types that
validate them, so clients and fuzzers see the rules that apply."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin

from .schemas import ChatCompletionRequest, CompletionRequest

REQUEST_BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


def exact_components() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        tuple(REQUEST_BODIES.values()), ref_template="#/components/schemas/{name}"
    )
    return components


def patch(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(exact_components())
    for path, kind in REQUEST_BODIES.items():
        operation = document.get("paths", {}).get(path, {}).get("post")
        if operation is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{kind.__name__}"}}},
            }
    return document


class ExactJsonRenderPlugin(JsonRenderPlugin):
    """/schema/openapi.json with the request bodies as msgspec states them."""

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        return msgspec.json.encode(patch(dict(openapi_schema)))
