"""Chats for the tests, as message lists: a system prompt, then user and assistant turns in turn."""

from __future__ import annotations


def conversation(system: str, *turns: str) -> list[dict]:
    """[system, user, assistant, user, ...]: `turns` alternate, the user's first."""
    roles = ("user", "assistant")
    return [{"role": "system", "content": system}] + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
