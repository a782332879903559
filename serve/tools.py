"""Tool calling for models without a tool format of their own (Phi-3): the format, the grammar that enforces it and
the reader that turns a reply into OpenAI tool calls, streamed or whole.

The format (README, "Tools"; its texts are aegis/tool_format.py's, which the Ollama Modelfile's template writes too):
- the tools are described in the system turn: TOOLS_INTRO, one JSON object per tool ({"name", "description",
  "parameters"}) per line, then CALL_HOWTO;
- a call is a reply of nothing but {"tool_calls": [{"name": NAME, "arguments": {...}}, ...]};
- an assistant turn that called tools is rendered as that same JSON (after its text, if it had any), and a tool's
  result as a user turn {"tool_result": {"name": NAME, "content": TEXT}}.
Decoding is constrained: `required` and a named function admit only calls (of that function), whose arguments
follow the function's parameters; `auto` admits such calls or plain text that does not start with "{".
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from . import structured

# auto: a call, or text that cannot be mistaken for one (it does not start with "{" or blank space), or nothing
AUTO_RULES = 'root ::= json-reply | prose | ""\nprose ::= [^{ \\t\\n\\r] [^\\x00]*'


def grammar(tools: list[dict], choice: str, parallel: bool) -> str:
    """GBNF for the reply. tools: {"name", "parameters", "param"} each (param: where the parameters are in the
    request, set on the SchemaError when they cannot be enforced); choice: auto | required | a function's name."""
    checker = structured.Checker()
    alternatives = []
    if len(tools) > structured.MAX_ALTERNATIVES:
        raise structured.SchemaLimit(f"/: {len(tools)} tools, above the limit of {structured.MAX_ALTERNATIVES} per "
                                     f"request")
    for t in tools:
        if choice in ("auto", "required") or choice == t["name"]:
            try:
                params = checker.admit(t["parameters"])
            except structured.SchemaError as e:
                e.param = t["param"]
                raise
            alternatives.append({"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": params},
                                 "required": ["name", "arguments"]})
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
    if not parallel:
        calls["maxItems"] = 1
    schema = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
    return structured.grammar(schema, checker.defs, AUTO_RULES if choice == "auto" else "")


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class CallReader:
    """Reads a reply as it is generated: plain text is content; a reply that starts with "{" is a call object, whose
    calls come out as they are written (a call once its name is complete, then its arguments' text piece by piece).
    The grammar guarantees the object's shape; this only follows it."""
    mode: str | None = None  # content | calls, once the first character shows which
    content: str = ""
    calls: list[Call] = field(default_factory=list)
    _held: str = ""
    _depth: int = 0
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
            start = self._held.lstrip()
            if not start:
                return []
            self.mode = "calls" if start[0] == "{" else "content"
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

    def _flush(self, args: list[str], events: list[tuple]) -> None:
        if args:
            piece = "".join(args)
            args.clear()
            self.calls[-1].arguments += piece
            events.append(("arguments", len(self.calls) - 1, piece))

    def _step(self, ch: str, args: list[str], events: list[tuple]) -> None:
        if self._in_string:
            if self._in_args:
                args.append(ch)
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
                self._last_string = json.loads("".join(self._string) + '"')
                if self._depth == 3 and self._key == "name":  # a call's name: the call starts here
                    self._flush(args, events)
                    self.calls.append(Call(f"call_{uuid.uuid4().hex[:24]}", self._last_string))
                    events.append(("call", len(self.calls) - 1, self.calls[-1]))
                    self._key = None
                return
            self._string.append(ch)
            return
        if ch == '"':
            self._in_string, self._string = True, ['"']
        elif ch in "{[":
            self._depth += 1
            # depth 1: the object, 2: the list of calls, 3: a call, 4: its arguments
            self._in_args = self._in_args or (self._depth == 4 and self._key == "arguments")
        if self._in_args:
            args.append(ch)
        if ch in "}]":
            self._depth -= 1
            if self._in_args and self._depth == 3:
                self._in_args, self._key = False, None
        elif ch == ":" and self._depth == 3:
            self._key = self._last_string
