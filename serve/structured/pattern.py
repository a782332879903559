"""Patterns the grammar enforces: the regular-expression subset llama.cpp's converter writes exactly, held to the
limits so no pattern can crash the parser or slow decoding."""

from __future__ import annotations

import re

from .limits import MAX_DEPTH, MAX_GROUP_REPEAT, MAX_REPEAT, MAX_REPEAT_PRODUCT, SchemaError, limit

_QUANTIFIER = re.compile(r"[?*+]|\{(\d+)(,(\d*))?\}")


def check_pattern(pattern, where: str) -> str:
    if not isinstance(pattern, str) or len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$":
        raise SchemaError(f"{where}: a pattern must be anchored, ^...$")
    body, i = pattern[1:-1], 0
    # per open group: [the largest count product inside it so far, whether its length varies (it holds a
    # repetition or alternatives: repeated, each way to split the text is a parse state of its own)]
    groups: list[list] = [[1, False]]
    while i < len(body):
        c, atom = body[i], True
        if c == "\\":
            if i + 1 >= len(body) or body[i + 1] not in "[](){}*+?|":
                raise SchemaError(f"{where}: the escape at {i + 1} is not supported (write a class such as [0-9])")
            i += 2
        elif c == "[":
            end = body.find("]", i + 1)
            inner = body[i + 1 : end]
            if end < 0 or not inner or inner[0] == "^" or any(ch in '"\\' or ord(ch) < 0x20 for ch in inner):
                raise SchemaError(f"{where}: the class at {i + 1} is not supported (no negation, escapes or quotes)")
            i = end + 1
        elif c == "(":
            if body[i + 1 : i + 2] == "?":
                raise SchemaError(f"{where}: (?...) groups are not supported")
            groups.append([1, False])
            if len(groups) > MAX_DEPTH:
                raise limit(where, f"groups nested {len(groups) - 1} deep at {i + 1}", MAX_DEPTH, "levels")
            i, atom = i + 1, False
        elif c == ")":
            if len(groups) == 1:
                raise SchemaError(f"{where}: unbalanced parentheses")
            inner, repeats = groups.pop()
            i = _quantified(body, i + 1, inner, repeats, groups[-1], where)
            continue
        elif c in "{*+?":
            if c == "{" and not _QUANTIFIER.match(body, i):
                raise SchemaError(f"{where}: the repetition at {i + 1} must be {{m}}, {{m,}} or {{m,n}}")
            raise SchemaError(f"{where}: the repetition at {i + 1} repeats nothing")
        elif c == "|":
            groups[-1][1], atom = True, False
            i += 1
        elif c in '^$"' or ord(c) < 0x20 or c == "\x7f":
            raise SchemaError(f"{where}: {c!r} at {i + 1} is not supported inside a pattern")
        else:
            i += 1
        if atom:
            i = _quantified(body, i, 1, False, groups[-1], where)
    if len(groups) > 1:
        raise SchemaError(f"{where}: unbalanced parentheses")
    return pattern


def _quantified(body: str, i: int, inner: int, repeats: bool, parent: list, where: str) -> int:
    """After an atom or a group (whose largest count product inside is `inner`) at i: its quantifier if any,
    checked against the limits and recorded in the parent group; the index after it."""
    m = _QUANTIFIER.match(body, i) if i < len(body) else None
    if not m:
        parent[0], parent[1] = max(parent[0], inner), parent[1] or repeats
        return i
    if m.group(1) is not None:
        low = int(m.group(1))
        high = low if m.group(2) is None else int(m.group(3)) if m.group(3) else None
        if high is not None and high < low:
            raise SchemaError(f"{where}: the repetition at {i + 1} has its maximum below its minimum")
        count = max(low, high or 0)
    else:
        high = 1 if m.group(0) == "?" else None
        count = 1
    count = max(count, 1 if high == 1 else 2)  # unbounded: at least two ways to split the text
    if count > MAX_REPEAT:
        raise limit(where, f"the repetition at {i + 1} counts {count:,}", MAX_REPEAT, "")
    if repeats and count > MAX_GROUP_REPEAT:
        raise limit(
            where, f"the group before {i + 1} varies in length and repeats {count:,} times", MAX_GROUP_REPEAT, "times"
        )
    product = count * inner
    if product > MAX_REPEAT_PRODUCT and inner > 1:
        raise limit(where, f"the repetitions nested at {i + 1} multiply to {product:,}", MAX_REPEAT_PRODUCT, "")
    parent[0], parent[1] = max(parent[0], product), True
    if m.end() < len(body) and body[m.end()] in "{*+?":
        raise SchemaError(f"{where}: the repetition at {m.end() + 1} repeats a repetition (use a group)")
    return m.end()
