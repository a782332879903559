"""The one request path both completion endpoints share (prepare -> submit -> stream or collect), and the shapes of
their replies: a Reply turns a job's text pieces and scored tokens into OpenAI's chunks while streaming, or into one
body; ChatReply also reads tool calls out of the text (tools.CallReader), TextReply writes legacy logprobs. A request
that the server's shutdown cuts off ends in the same shapes (cut_off)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

import msgspec
from litestar import MediaType, Request, Response
from litestar.response import Stream

from . import engine
from .errors import APIError, shutting_down
from .job import Finish, Job, Scored
from .responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FunctionCallOut,
    PromptTokensDetails,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
    Usage,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
TIMEOUT = "the request did not finish within the server's timeout"


def _usage(finish: Finish) -> Usage:
    return Usage(
        finish.prompt_tokens,
        finish.completion_tokens,
        finish.prompt_tokens + finish.completion_tokens,
        PromptTokensDetails(finish.cached_tokens),
    )


def _sse(payload) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def _raise_for(finish: Finish) -> None:
    if finish.reason == "timeout":
        raise APIError(504, TIMEOUT)
    if finish.reason == "error":
        raise APIError(500, f"generation failed: {finish.error}", code="generation_failed")


class Reply:
    """One reply's identity and shape; subclasses say how a choice looks."""

    prefix = "cmpl"
    chunk_object = "text_completion"

    def __init__(self, p: engine.Prepared):
        self.p, self.backend = p, p.model.backend
        self.id, self.created, self.model = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time()), p.model.name
        self._scored: list[Scored] = []

    def _token(self, token: int) -> str:
        return self.backend.token_bytes(token).decode("utf-8", errors="replace")

    def chunk(self, choice: dict) -> dict:
        return {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, **choice}],
        }

    def take(self, items: list) -> list[str]:
        """The text pieces of items; scored tokens wait in self._scored for the next choice to carry them."""
        self._scored += [i for i in items if isinstance(i, Scored)]
        return [i for i in items if isinstance(i, str)]

    def opening(self) -> list[dict]:
        return []

    def chunks(self, items: list) -> list[dict]:
        raise NotImplementedError

    def closing(self, finish: Finish) -> list[dict]:
        raise NotImplementedError

    def body(self, items: list, finish: Finish):
        raise NotImplementedError


class ChatReply(Reply):
    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def __init__(self, p: engine.Prepared):
        super().__init__(p)
        self.reader = p.model.backend.tool_format.reader() if p.tools else None

    def _logprobs(self) -> dict | None:
        if self.p.logprobs is None:
            return None

        def entry(token: int, logprob: float) -> tuple[str, float, list[int]]:
            return self._token(token), logprob, list(self.backend.token_bytes(token))

        entries = [
            TokenLogprob(*entry(s.token, s.logprob), [TopLogprob(*entry(t, lp)) for t, lp in s.top])
            for s in self._scored
        ]
        self._scored = []
        return ChoiceLogprobs(entries)

    def _deltas(self, text: str) -> list[dict]:
        if self.reader is None:
            return [{"content": text}]
        deltas = []
        for event in self.reader.feed(text):
            if event[0] == "content":
                deltas.append({"content": event[1]})
            elif event[0] == "call":
                _, i, call = event
                deltas.append(
                    {
                        "tool_calls": [
                            {
                                "index": i,
                                "id": call.id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
            else:
                deltas.append({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})
        return deltas

    def _calls_whole(self, finish: Finish) -> bool:
        """The reply is tool calls that all ended: each one's arguments parse. A reply cut short (max_tokens)
        is not, and is given back as text with its own finish reason (length), never as calls that do not parse."""
        if self.reader is None or not self.reader.calls or finish.reason != "stop":
            return False
        try:
            return all(isinstance(json.loads(c.arguments), dict) for c in self.reader.calls)
        except ValueError:
            return False

    def _finish_reason(self, finish: Finish) -> str:
        return "tool_calls" if self._calls_whole(finish) else finish.reason

    def opening(self) -> list[dict]:
        return [self.chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})]

    def chunks(self, items: list) -> list[dict]:
        out = []
        for text in self.take(items):
            for delta in self._deltas(text):
                out.append(
                    self.chunk(
                        {"delta": delta, "logprobs": msgspec.to_builtins(self._logprobs()), "finish_reason": None}
                    )
                )
        return out

    def closing(self, finish: Finish) -> list[dict]:
        return [
            self.chunk(
                {
                    "delta": {},
                    "logprobs": msgspec.to_builtins(self._logprobs()),
                    "finish_reason": self._finish_reason(finish),
                }
            )
        ]

    def body(self, items: list, finish: Finish) -> ChatCompletion:
        text = "".join(self.take(items))
        if self.reader is not None:
            self.reader.feed(text)
        if self.reader is not None and self.reader.mode == "calls" and self._calls_whole(finish):
            calls = [ToolCallOut(c.id, FunctionCallOut(c.name, c.arguments)) for c in self.reader.calls]
            message = AssistantMessage("assistant", None, calls)
        else:
            message = AssistantMessage("assistant", text)
        choice = ChatChoice(0, message, self._finish_reason(finish), self._logprobs())
        return ChatCompletion(self.id, self.created, self.model, [choice], _usage(finish))


class TextReply(Reply):
    def __init__(self, p: engine.Prepared):
        super().__init__(p)
        self.offset = 0  # characters of completion text before the next scored token

    def _logprobs(self) -> CompletionLogprobs | None:
        if self.p.logprobs is None:
            return None
        out = CompletionLogprobs([], [], [], [])
        for s in self._scored:
            token = self._token(s.token)
            out.tokens.append(token)
            out.token_logprobs.append(s.logprob)
            out.top_logprobs.append({self._token(t): lp for t, lp in s.top})
            out.text_offset.append(self.offset)
            self.offset += len(token)
        self._scored = []
        return out

    def chunks(self, items: list) -> list[dict]:
        return [
            self.chunk({"text": text, "logprobs": msgspec.to_builtins(self._logprobs()), "finish_reason": None})
            for text in self.take(items)
        ]

    def closing(self, finish: Finish) -> list[dict]:
        return [
            self.chunk({"text": "", "logprobs": msgspec.to_builtins(self._logprobs()), "finish_reason": finish.reason})
        ]

    def body(self, items: list, finish: Finish) -> Completion:
        text = "".join(self.take(items))
        choice = CompletionChoice(0, text, finish.reason, self._logprobs())
        return Completion(self.id, self.created, self.model, [choice], _usage(finish))


# ---- the request path -------------------------------------------------------------------------------------------


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
            last["choices"], last["usage"] = [], msgspec.to_builtins(_usage(job.finish))
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
