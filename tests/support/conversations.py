"""The tests' conversations: CONVERSATIONS check a chat template's renderers against transformers' own (the server's
prompt, export's Go template): one turn, a system prompt, an empty one, several turns, text that looks like markup or a
template, and whitespace at both ends of a message; conversation() writes a chat out as its message list."""

from __future__ import annotations

CONVERSATIONS = [
    [{"role": "user", "content": "こんにちは"}],
    [{"role": "system", "content": "あなたは親切なアシスタントです。"}, {"role": "user", "content": "天気は?"}],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "一"},
        {"role": "assistant", "content": "二"},
        {"role": "user", "content": "三 <b>&amp;</b> {{ x }}"},
    ],
    [{"role": "system", "content": "丁寧に答えてください。"}, {"role": "user", "content": "富士山の高さは？"}],
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "こんにちは！"},
        {"role": "user", "content": "日本語で話して"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": " 空白で始まる\n改行も "}],
]


def conversation(system: str, *turns: str) -> list[dict]:
    """[system, user, assistant, user, ...]: `turns` alternate, the user's first."""
    roles = ("user", "assistant")
    return [{"role": "system", "content": system}] + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
