"""The one request path both completion endpoints share (prepare -> submit -> stream or collect): a queued job's
events delivered as server-sent events or collected into one body, in the shapes of serve/replies.py. A request
that the server's shutdown cuts off ends in the same shapes (cut_off)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import msgspec
from litestar import MediaType, Request, Response
from litestar.response import Stream

from . import engine
from .errors import APIError, shutting_down
from .job import Finish, Job
from .replies import Reply, usage_of

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
TIMEOUT = "the request did not finish within the server's timeout"


def _sse(payload) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def _raise_for(finish: Finish) -> None:
    if finish.reason == "timeout":
        raise APIError(504, TIMEOUT)
    if finish.reason == "error":
        raise APIError(500, f"generation failed: {finish.error}", code="generation_failed")


async def _watch_disconnect(request: Request, job: Job) -> None:
    # the body has been read, so the next ASGI message is the disconnect: a client that gives up on a non-streamed
    # request frees its worker too
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _collect(request: Request, job: Job) -> list:
    items = []
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        async for batch in job.events():
            items.extend(batch)
    except TimeoutError:
        raise APIError(504, TIMEOUT) from None
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once finished
    _raise_for(job.finish)
    return items


async def _stream(job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        for chunk in reply.opening():
            yield _sse(chunk)
        try:
            async for batch in job.events():
                # one event per piece, as OpenAI sends them, but one write for all that arrived together
                yield b"".join(_sse(c) for c in reply.chunks(batch))
            _raise_for(job.finish)
        except (TimeoutError, APIError) as e:  # headers are gone: the error travels as an event, as OpenAI does
            yield _sse((e if isinstance(e, APIError) else APIError(504, TIMEOUT)).body())
            yield DONE
            return
        for chunk in reply.closing(job.finish):
            yield _sse(chunk)
        if include_usage:
            last = reply.chunk({})
            last["choices"], last["usage"] = [], msgspec.to_builtins(usage_of(job.finish))
            yield _sse(last)
        yield DONE
    finally:
        # the client went away (the stream was cancelled) or we are done: the worker stops at its next token
        job.cancel()


async def respond(request: Request, p: engine.Prepared, reply: Reply, timeout: float) -> Response:
    """Queue the prepared job; stream its reply as server-sent events or answer with the whole body."""
    job = engine.submit(p, timeout)
    if p.stream:
        return Stream(_stream(job, reply, p.include_usage), media_type="text/event-stream", headers=SSE_HEADERS)
    items = await _collect(request, job)
    return Response(reply.body(items, job.finish), media_type=MediaType.JSON)


def cut_off(app, stopping: Callable[[], bool]):
    """ASGI middleware: when the shutdown grace period is over the server cancels the requests still running
    (serve/server.py); each then ends as any failure of the API ends, not as a cut connection: the JSON 503
    (shutting_down) if nothing was sent yet, an error event and [DONE] if a stream was under way.
    stopping(): whether the server is shutting down (any other cancellation is passed on)."""

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        state = {"started": False, "stream": False, "done": False}

        async def watched(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                headers = dict((k.lower(), v) for k, v in message.get("headers", []))
                state["stream"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif not message.get("more_body", False):
                state["done"] = True
            await send(message)

        try:
            await app(scope, receive, watched)
        except asyncio.CancelledError:
            if not stopping() or state["done"]:
                raise
            asyncio.current_task().uncancel()  # handled: the ending below is this request's last word
            err = shutting_down()
            if not state["started"]:
                body = msgspec.json.encode(err.body())
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *((k.lower().encode(), v.encode()) for k, v in err.headers.items()),
                ]
                await send({"type": "http.response.start", "status": err.status, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
            else:
                await send(
                    {
                        "type": "http.response.body",
                        "body": _sse(err.body()) + DONE if state["stream"] else b"",
                        "more_body": False,
                    }
                )

    return guarded
