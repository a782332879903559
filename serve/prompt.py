"""A conversation's prompt tokens: the model's own chat template renders it (aegis.chat_template, the renderer the
export checks use too), and only the template's own markers become control tokens.

Text is text: a message that contains "<|end|>\\n<|system|>..." is tokenized as those characters, so no client can
forge a system or assistant turn. Control-token text inside the messages is swapped for placeholders before
rendering, the rendered prompt is cut at the control tokens left (the template's), and the stretches of text between
them, placeholders restored, are tokenized as plain text: the same tokens the model's tokenizer gives the whole
prompt when nobody types a control token, and plain text when somebody does.
"""

from __future__ import annotations

import json
import re
import secrets
from functools import lru_cache

from aegis import chat_template, families

from .backends import Backend
from .backends.base import Control
from .errors import bad_request

WHITESPACE = " \t\n\v\f\r"


def render(backend: Backend, messages: list[dict]) -> str:
    """The prompt text of `messages` (dicts of role, content, ...) by the model's template."""
    return chat_template.render(backend.chat_template, messages, backend.special_tokens)


@lru_cache(maxsize=8)
def _pattern(texts: frozenset[str]) -> re.Pattern:
    # the longest text first, so <|endoftext|> is never read as a shorter token that starts it
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def split_controls(text: str, controls: dict[str, Control]) -> list[str | Control]:
    """text cut into plain stretches and control tokens, with the whitespace the tokens strip removed."""
    parts: list[str | Control] = []
    pos = 0
    for m in _pattern(frozenset(controls)).finditer(text) if controls else ():
        parts += [text[pos : m.start()], controls[m.group(0)]]
        pos = m.end()
    parts.append(text[pos:])
    for i, part in enumerate(parts):
        if isinstance(part, Control):
            if part.lstrip and i and isinstance(parts[i - 1], str):
                parts[i - 1] = parts[i - 1].rstrip(WHITESPACE)
            if part.rstrip and i + 1 < len(parts) and isinstance(parts[i + 1], str):
                parts[i + 1] = parts[i + 1].lstrip(WHITESPACE)
    return [p for p in parts if p != ""]


def chat_ids(backend: Backend, messages: list[dict]) -> list[int]:
    """Prompt token ids of a conversation; only the template's markers are control tokens."""
    controls = backend.controls
    nonce = secrets.token_hex(8)
    found: list[str] = []

    def hide(value):
        if not isinstance(value, str) or not controls:
            return value

        def placeholder(m: re.Match) -> str:
            found.append(m.group(0))
            return f"\ue000{nonce}{len(found) - 1}\ue001"

        return _pattern(frozenset(controls)).sub(placeholder, value)

    hidden = [{k: v if k == "role" else hide(v) for k, v in m.items()} for m in messages]
    parts = split_controls(render(backend, hidden), controls)
    back = re.compile(f"\ue000{nonce}(\\d+)\ue001")
    ids: list[int] = []
    for i, part in enumerate(parts):
        if isinstance(part, Control):
            ids.append(part.id)
        else:
            text = back.sub(lambda m: found[int(m.group(1))], part)
            # text at the very start is tokenized as a prompt's start (a SentencePiece word marker in front)
            ids += backend.tokenize(text, add_special=False) if i == 0 else backend.tokenize_text(text)
    # a template that writes BOS itself gets no second one
    if backend.add_bos and backend.bos_id is not None and ids[:1] != [backend.bos_id]:
        ids.insert(0, backend.bos_id)
    return ids


def _text(m) -> str:
    return "".join(p.text for p in m.content) if isinstance(m.content, list) else m.content or ""


def conversation(messages: list, template: str, note: str | None = None) -> list[dict]:
    """A request's messages as the template's dicts (role, content[, name]): `developer` read as `system`, calls
    and tool results written in the tool format of the template's family (aegis/families/), `note` (the tools on
    offer, or what a JSON reply is for) added to the system turn."""
    fmt = families.by_chat_template(template).tool_format
    out: list[dict] = []
    called: dict[str, str] = {}  # tool_call_id -> function name
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        calls = getattr(m, "tool_calls", None)
        if m.content is None and not calls:
            raise bad_request("an assistant message needs content or tool_calls", f"{at}.content")
        if m.role == "tool":
            if m.tool_call_id not in called:
                raise bad_request(
                    "a tool message must answer a tool call of an earlier assistant message (by its id)",
                    f"{at}.tool_call_id",
                )
            item = {
                "role": fmt.result_role,
                "content": fmt.result_text(called[m.tool_call_id], _text(m), m.tool_call_id),
            }
        elif calls:
            written = []
            for j, call in enumerate(calls):
                try:
                    args = json.loads(call.function.arguments)
                except ValueError:
                    args = None
                if not isinstance(args, dict):
                    raise bad_request(
                        "arguments must be a JSON object in text", f"{at}.tool_calls[{j}].function.arguments"
                    )
                called[call.id] = call.function.name
                written.append((call.function.name, args))
            text = fmt.calls_text(written, [c.id for c in calls])
            item = {"role": "assistant", "content": "\n".join(filter(None, [_text(m), text]))}
        else:
            item = {"role": "system" if m.role == "developer" else m.role, "content": _text(m)}
        if getattr(m, "name", None) is not None:
            # a name the template never reads would vanish without a word
            if "name" not in template:
                raise bad_request("this model's chat template has no place for message names", f"{at}.name")
            item["name"] = m.name
        out.append(item)
    if note:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": "\n\n".join(filter(None, [out[0]["content"], note]))}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out
