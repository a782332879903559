"""The reader of a reply that may hold tool calls, for every tool format (aegis/tool_format.py): it follows the JSON
nesting of the reply and takes a call object ({"name", "arguments"}) at the depth its format puts them; text outside
the JSON (a format's <tool_call> tags, the newlines between calls) is skipped. The grammar guarantees the shape while
a reply is generated; a reply cut short leaves a last call whose arguments do not parse, and the caller decides."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class CallReader:
    """Reads a reply as it is generated: a reply that starts (after blank space) with `opening` is calls, whose calls
    come out as they are written (a call once its name is complete, then its arguments' text piece by piece); any
    other reply is content. `opening`: one text or several (a reply of calls starts with any of them); `depth`: the
    nesting level of a call object (1: the reply's top-level objects); `key`: the call object's key for its
    arguments."""

    opening: str | tuple[str, ...] = "{"
    depth: int = 3
    key: str = "arguments"
    mode: str | None = None  # content | calls, once the first characters show which
    content: str = ""
    calls: list[Call] = field(default_factory=list)
    _held: str = ""
    _level: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _string: list[str] = field(default_factory=list)
    _last_string: str | None = None
    _key: str | None = None
    _in_args: bool = False

    def feed(self, text: str) -> list[tuple]:
        """Events for text: ("content", text) | ("call", index, Call) | ("arguments", index, text)."""
        if self.mode is None:
            self._held += text
            start, openings = self._held.lstrip(), self._openings()
            if not start or (not start.startswith(openings) and any(o.startswith(start) for o in openings)):
                return []  # not yet known: what came may still be an opening
            self.mode = "calls" if start.startswith(openings) else "content"
            text, self._held = self._held, ""
        if self.mode == "content":
            self.content += text
            return [("content", text)]
        events: list[tuple] = []
        args: list[str] = []
        for ch in text:
            self._step(ch, args, events)
        self._flush(args, events)
        return events

    def _openings(self) -> tuple[str, ...]:
        return (self.opening,) if isinstance(self.opening, str) else self.opening

    def _flush(self, args: list[str], events: list[tuple]) -> None:
        if args:
            piece = "".join(args)
            args.clear()
            self.calls[-1].arguments += piece
            events.append(("arguments", len(self.calls) - 1, piece))

    def _step(self, ch: str, args: list[str], events: list[tuple]) -> None:
        if self._in_string:
            self._string_char(ch, args, events)
            return
        if ch == '"' and self._level:
            self._in_string, self._string = True, ['"']
        elif ch in "{[":
            self._level += 1
            # a call object's arguments value opens one level below the call
            self._in_args = self._in_args or (self._level == self.depth + 1 and self._key == self.key)
        if self._in_args:
            args.append(ch)
        if ch in "}]" and self._level:
            self._level -= 1
            if self._in_args and self._level == self.depth:
                self._in_args, self._key = False, None
        elif ch == ":" and self._level == self.depth:
            self._key = self._last_string

    def _string_char(self, ch: str, args: list[str], events: list[tuple]) -> None:
        if self._in_args:
            args.append(ch)
        if self._escaped:
            self._escaped = False
        elif ch == "\\":
            self._escaped = True
        elif ch == '"':
            self._in_string = False
            self._last_string = json.loads("".join(self._string) + '"')
            if self._level == self.depth and self._key == "name":  # a call's name: the call starts here
                self._flush(args, events)
                self.calls.append(Call(f"call_{uuid.uuid4().hex[:24]}", self._last_string))
                events.append(("call", len(self.calls) - 1, self.calls[-1]))
                self._key = None
            return
        self._string.append(ch)
