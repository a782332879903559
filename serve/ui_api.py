"""The OpenAI-protocol calls the chat page makes (models, streamed chat completions), each failure turned into one
line for the person at the page, and what the page reads from its fields before it asks (stop sequences as typed)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

STOP_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


class UIError(Exception):
    """Something the person at the UI should read (the API is down, refused the key, rejected a value ...)."""


def explain(e: Exception, api: str) -> str:
    """One clear line for an error of the openai client."""
    import openai

    if isinstance(e, openai.APITimeoutError):
        return f"the API at {api} did not answer in time"
    if isinstance(e, openai.APIConnectionError):
        return f"cannot reach the API at {api}: is the server running?"
    if isinstance(e, openai.APIStatusError):
        body = e.body if isinstance(e.body, dict) else {}
        detail = body.get("message") or (body.get("error") or {}).get("message") if body else None
        return f"the API answered {e.status_code}: {detail or e.message}"
    if isinstance(e, openai.APIError):
        return f"the API reported an error: {e.message}"
    return f"{type(e).__name__}: {e}"


@dataclass
class Model:
    id: str
    context: int | None  # tokens, from /v1/models' context_length (None where the server does not say)
    base: bool  # the untrained base: offered for Compare, not for chatting


class Api:
    """The OpenAI-protocol calls the UI makes (async, so that a stopped reply closes its HTTP stream at once, which
    is what cancels the generation on the server)."""

    def __init__(self, base_url: str, api_key: str | None, base_name: str = "base", timeout: float = 120.0):
        import openai

        self.base_url = base_url
        self.base_name = base_name
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=timeout)

    async def models(self) -> list[Model]:
        """Trained models first (in the server's order), the base last."""
        try:
            found = (await self.client.models.list()).data
        except Exception as e:  # noqa: BLE001 - every failure becomes a message on the page
            raise UIError(explain(e, self.base_url)) from e
        models = [Model(m.id, getattr(m, "context_length", None), m.id == self.base_name) for m in found]
        return sorted(models, key=lambda m: m.base)

    async def stream(
        self, model: str, messages: list[dict], temperature: float, top_p: float, max_tokens: int, stop: list[str]
    ) -> AsyncIterator[str]:
        if not model:
            raise UIError("no model selected (is the API up? press ⟳ to reload the list)")
        limit: int | None = int(max_tokens)
        while True:
            try:
                chunks = await self.client.chat.completions.create(
                    model=model,
                    messages=messages,
                    temperature=temperature,
                    top_p=top_p,
                    max_tokens=limit,
                    stop=stop or None,
                    stream=True,
                )
                break
            except Exception as e:  # noqa: BLE001
                if getattr(e, "code", None) != "context_length_exceeded":
                    raise UIError(explain(e, self.base_url)) from e
                # as chat apps do: the oldest turns leave the window first; a lone message too long for the
                # chosen max tokens gets the rest of the context instead (the server's default)
                shorter = fit(messages)
                if shorter is not None:
                    messages = shorter
                elif limit is not None:
                    limit = None
                else:
                    raise UIError(explain(e, self.base_url)) from e
        try:
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except Exception as e:  # noqa: BLE001
            raise UIError(explain(e, self.base_url)) from e
        finally:  # also when the reader is cancelled (stop, clear): closing the stream ends the generation
            await chunks.close()


def fit(messages: list[dict]) -> list[dict] | None:
    """The messages without their oldest exchange (the system message and the last message stay), or None when
    nothing is left to drop."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system) :]
    if len(rest) <= 1:
        return None
    rest = rest[1:]
    while len(rest) > 1 and rest[0]["role"] != "user":  # a window starts with the person's message
        rest = rest[1:]
    return system + rest


def parse_stops(text: str) -> list[str]:
    """Stop sequences, one per line; \\n, \\t, \\r and \\\\ are understood, any other backslash is kept as typed."""
    unescape = lambda m: STOP_ESCAPES.get(m.group(1), m.group(0))  # noqa: E731
    stops = [re.sub(r"\\(.)", unescape, line) for line in (text or "").splitlines() if line]
    return stops[:4]
