"""What the structured-output tests ask the server for: a reply decoded under a response_format, read as JSON."""

from __future__ import annotations

import json


def json_reply(client, messages: list[dict], response_format: dict, seed: int, max_tokens: int):
    """The JSON of a chat reply sampled (temperature 1) under `response_format`; the reply must have ended by itself,
    not at max_tokens."""
    asked = dict(messages=messages, response_format=response_format, seed=seed, max_tokens=max_tokens)
    r = client.chat.completions.create(model="tiny", temperature=1.0, **asked)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    return json.loads(r.choices[0].message.content)
