"""The shapes of the completion endpoints' replies: a Reply turns a job's text pieces and scored tokens into OpenAI's
chunks while streaming, or into one body; ChatReply also reads tool calls from the text (aegis.tool_reader.CallReader),
TextReply writes legacy logprobs. serve/request_path.py delivers them."""

from __future__ import annotations

import json
import time
import uuid

import msgspec

from . import engine
from .job import Finish, Scored
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


def usage_of(finish: Finish) -> Usage:
    return Usage(
        finish.prompt_tokens,
        finish.completion_tokens,
        finish.prompt_tokens + finish.completion_tokens,
        PromptTokensDetails(finish.cached_tokens),
    )


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
        return ChatCompletion(self.id, self.created, self.model, [choice], usage_of(finish))


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
        return Completion(self.id, self.created, self.model, [choice], usage_of(finish))
