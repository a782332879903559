"""Every error leaves the API in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with the status that
says whose fault it is. Litestar's own exceptions (bad JSON, failed validation, unknown route, oversized body) are
translated here too, so no client ever sees another format or a 500 for something it sent."""

from __future__ import annotations

import logging
import re

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

log = logging.getLogger("serve")

TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}
CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    429: "queue_full",
    499: "client_closed_request",
    503: "model_not_ready",
    504: "timeout",
}
# nginx's number for "the client closed the connection before the answer": counted as a client error, never a 5xx
CLIENT_GONE = 499
SHUTTING_DOWN = "the server is shutting down; retry on another replica or later"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or CODES.get(status, "invalid_request" if status == 400 else None)
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def shutting_down() -> APIError:
    # Connection: close, so that a client (or a balancer) sends its next request on a new connection, elsewhere
    return APIError(503, SHUTTING_DOWN, code="shutting_down", headers={"Retry-After": "1", "Connection": "close"})


class ClientGone(Exception):
    """The client closed its connection before its request body arrived in full (an abandoned upload)."""


class BodyTimeout(Exception):
    """The request body did not arrive in full within --body-timeout."""


def _response(err: APIError) -> Response:
    if err.status < 500:
        log.debug("client error %d %s: %s", err.status, err.param, err.message)
    return Response(err.body(), status_code=err.status, media_type=MediaType.JSON, headers=err.headers)


def _param_of(message: str) -> str | None:
    """msgspec names the failing field as `$.messages[0].role`; OpenAI's `param` is `messages[0].role`."""
    m = re.search(r"at `\$\.?([^`]*)`", message)
    return m.group(1) or None if m else None


def _validation_message(exc: ValidationException) -> tuple[str, str | None]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict) and item.get("message"):
            msg, key = str(item["message"]), item.get("key") or None
            if key == "data":  # Litestar's name for the whole body
                key = None
                if msg == "'data'":
                    msg = "a JSON object is required as the request body"
            return msg, _param_of(msg) or key
    detail = str(exc.detail or "invalid request body")
    return detail, _param_of(detail)


def on_api_error(_: Request, exc: APIError) -> Response:
    return _response(exc)


def on_http_exception(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        message, param = _validation_message(exc)
        return _response(APIError(400, message, param))
    if status == 400:  # the body could not be decoded at all
        return _response(APIError(400, f"the request body is not valid JSON: {exc.detail}", code="invalid_json"))
    if status == 404:
        return _response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))
    if status == 405:
        return _response(APIError(405, f"method {request.method} is not allowed on {request.url.path}"))
    if status == 413:
        return _response(APIError(413, "the request body is too large"))
    if status >= 500:
        log.error("server error on %s %s: %s", request.method, request.url.path, exc.detail)
        return _response(APIError(status, "internal server error", code="internal_error"))
    return _response(APIError(status, str(exc.detail)))


def on_client_gone(request: Request, _: ClientGone) -> Response:
    # the client's doing, not the server's: logged as a client event and counted under 499 (nobody reads the reply)
    log.info(
        "client %s went away before sending all of its %s %s body", _client(request), request.method, request.url.path
    )
    return _response(APIError(CLIENT_GONE, "the client closed the connection before its request body arrived"))


def on_body_timeout(request: Request, exc: BodyTimeout) -> Response:
    log.info("client %s: %s %s body %s; answered 408", _client(request), request.method, request.url.path, exc)
    # Connection: close: the rest of the body may still come, and it is not read
    return _response(APIError(408, f"the request body {exc}", headers={"Connection": "close"}))


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _response(APIError(500, "internal server error", code="internal_error"))


HANDLERS = {
    APIError: on_api_error,
    HTTPException: on_http_exception,
    ClientGone: on_client_gone,
    BodyTimeout: on_body_timeout,
    Exception: on_unexpected,
}
