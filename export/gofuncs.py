"""Go's text/template value semantics, as export/gotemplate.py evaluates them: truth, field lookup on data that
holds Go structs as dicts, and the built-in functions Ollama chat templates call (json as Go's json.Marshal writes
it)."""

from __future__ import annotations

import json


def truth(v) -> bool:
    return not (v is None or v is False or v == 0 or v == "" or (hasattr(v, "__len__") and len(v) == 0))


def field(obj, name: str):
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
        for k in obj:  # Ollama's messages are Go structs (Role, Content); accept JSON-style keys too
            if isinstance(k, str) and k.lower() == name.lower():
                return obj[k]
        return None
    return getattr(obj, name, None)


def path(obj, dotted: str):
    for name in [p for p in dotted.split(".") if p]:
        obj = field(obj, name)
    return obj


FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "not": lambda a: not truth(a),
    "len": lambda a: len(a),
    "index": lambda a, *i: _index(a, i),
    "slice": lambda a, *i: a[i[0] : (i[1] if len(i) > 1 else None)],
    "json": lambda a: _go_json(a),
}


def _go_json(value) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def and_or(name: str, args: list):
    """Go's and / or: the first argument that decides (falsy for and, truthy for or), else the last."""
    out = name == "and"
    for a in args:
        out = a
        if truth(a) != (name == "and"):
            break
    return out


def _index(a, idx):
    for i in idx:
        a = a[i]
    return a
