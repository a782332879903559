"""Tool-call formats: how the tools are described in the prompt, how a model writes a call, how a tool's result goes
back, the grammar rules that enforce a call reply, and the reader that turns a reply into OpenAI tool calls, whole or
streamed. One class per format, registered by name in FORMATS; a model family (aegis/families/) names the format its
chat template uses. The server (serve/tools.py, serve/prompt.py) and the Ollama Modelfile's template
(export/chat_formats.py) write the same texts.

- `json` (AEGIS's own, for families without a format of their own: Phi-3): the tools in the system turn as
  TOOLS_INTRO, one JSON object per tool ({"name", "description", "parameters"}) per line, then CALL_HOWTO; a call is a
  reply of nothing but {"tool_calls": [{"name": NAME, "arguments": {...}}, ...]}; a tool's result is a user turn
  {"tool_result": {"name": NAME, "content": TEXT}}.
- `hermes` (ChatML models: Qwen2, Hermes): the tools inside <tools></tools> in the system turn; each call is
  <tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>, calls one per line; a tool's result is a user turn
  <tool_response>\\nTEXT\\n</tool_response>.
An assistant turn that called tools is rendered as its text (if any), a newline, then its calls as written.
"""

from __future__ import annotations

import json

from .tool_reader import Call, CallReader

__all__ = ["Call", "CallReader", "FORMATS", "JSON", "ToolFormat", "get", "register", "system_text"]

TOOLS_INTRO = ("You can call the tools below. Each line describes one tool: its name, what it does and the JSON "
               "Schema of its arguments.")
CALL_HOWTO = ('To call tools, reply with nothing but a JSON object of this form: {"tool_calls": [{"name": '
              '"TOOL_NAME", "arguments": {...}}]}. Each result comes back in a user turn as {"tool_result": '
              '{"name": "TOOL_NAME", "content": "..."}}. Otherwise, reply in plain text.')
HERMES_INTRO = ("You can call the tools below. The JSON Schema of each one, its name, what it does and its "
                "arguments, is inside <tools></tools>:\n<tools>")
HERMES_HOWTO = ('</tools>\nTo call a tool, reply with <tool_call>\n{"name": "TOOL_NAME", "arguments": {...}}\n'
                '</tool_call> for each call, one per line, and nothing else. Each result comes back in a user turn '
                'inside <tool_response></tool_response>. Otherwise, reply in plain text.')
# plain text an `auto` reply may be: it cannot be mistaken for a call (it does not start like one, nor with blank
# space before one); {first} is the character class a call starts with
_PROSE = 'aegis-prose ::= [^{first} \\t\\n\\r] [^\\x00]*'
# The same texts in an Ollama Modelfile's Go template: a JSON line per tool of $.Tools, as _described writes them,
# and a call's JSON object, inside `range .ToolCalls`
_GO_TOOLS = ('{{ range $.Tools }}\n{"name":{{ json .Function.Name }}'
             '{{ if .Function.Description }},"description":{{ json .Function.Description }}{{ end }}'
             ',"parameters":{{ json .Function.Parameters }}}{{ end }}\n')
_GO_CALL = '{"name":{{ json .Function.Name }},"arguments":{{ json .Function.Arguments }}}'


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _described(tools: list[dict]) -> list[str]:
    return [_json({k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}) for t in tools]


class ToolFormat:
    """One tool-call format. `opening` is the text a reply of calls starts with; `depth` is how deep a call object
    ({"name", "arguments"}) sits in the reply's JSON (the reader follows the nesting, not the wrapper text)."""
    name: str
    opening: str
    depth: int
    # the Modelfile's Go template: the tools' description, an assistant message's .ToolCalls, a tool message
    go_tools: str
    go_calls: str
    go_result: str

    def system_text(self, tools: list[dict]) -> str:
        """The tools on offer, {"name", "description", "parameters"} each, as the system turn describes them."""
        raise NotImplementedError

    def calls_text(self, calls: list[tuple[str, object]]) -> str:
        """An assistant turn's calls, (name, parsed arguments) each, as the model writes them."""
        raise NotImplementedError

    def result_text(self, name: str, content: str) -> str:
        """A tool's result as the user turn that brings it back to the model."""
        raise NotImplementedError

    def reply_schema(self, call: dict, parallel: bool) -> dict:
        """The JSON Schema of the reply's JSON, given `call`, the schema of one call."""
        raise NotImplementedError

    def reply_rules(self, auto: bool, parallel: bool) -> str:
        """GBNF rules around the schema's rule `json-reply` ("" when the schema's rule is the root itself)."""
        raise NotImplementedError

    def reader(self) -> CallReader:
        return CallReader(self.opening, self.depth)


FORMATS: dict[str, ToolFormat] = {}


def register(cls: type[ToolFormat]) -> type[ToolFormat]:
    FORMATS[cls.name] = cls()
    return cls


def get(name: str) -> ToolFormat:
    return FORMATS[name]


@register
class JsonFormat(ToolFormat):
    name, opening, depth = "json", "{", 3  # the object, its list of calls, a call
    go_tools = TOOLS_INTRO + _GO_TOOLS + CALL_HOWTO
    go_calls = '{"tool_calls":[{{ range $j, $c := .ToolCalls }}{{ if $j }},{{ end }}' + _GO_CALL + '{{ end }}]}'
    go_result = '{"tool_result":{"name":{{ json .ToolName }},"content":{{ json .Content }}}}'

    def system_text(self, tools: list[dict]) -> str:
        return "\n".join([TOOLS_INTRO, *_described(tools), CALL_HOWTO])

    def calls_text(self, calls: list[tuple[str, object]]) -> str:
        return _json({"tool_calls": [{"name": name, "arguments": args} for name, args in calls]})

    def result_text(self, name: str, content: str) -> str:
        return _json({"tool_result": {"name": name, "content": content}})

    def reply_schema(self, call: dict, parallel: bool) -> dict:
        calls = {"type": "array", "minItems": 1, "items": call, **({} if parallel else {"maxItems": 1})}
        return {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}

    def reply_rules(self, auto: bool, parallel: bool) -> str:
        if not auto:
            return ""
        return 'root ::= json-reply | aegis-prose | ""\n' + _PROSE.format(first="{")


@register
class HermesFormat(ToolFormat):
    name, opening, depth = "hermes", "<tool_call>", 1  # each call is an object of its own
    go_tools = HERMES_INTRO + _GO_TOOLS + HERMES_HOWTO
    go_calls = ("{{ range $j, $c := .ToolCalls }}{{ if $j }}\n{{ end }}<tool_call>\n" + _GO_CALL
                + "\n</tool_call>{{ end }}")
    go_result = "<tool_response>\n{{ .Content }}\n</tool_response>"

    def system_text(self, tools: list[dict]) -> str:
        return "\n".join([HERMES_INTRO, *_described(tools), HERMES_HOWTO])

    def calls_text(self, calls: list[tuple[str, object]]) -> str:
        return "\n".join(f"<tool_call>\n{_json({'name': name, 'arguments': args})}\n</tool_call>"
                         for name, args in calls)

    def result_text(self, name: str, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    def reply_schema(self, call: dict, parallel: bool) -> dict:
        return call

    def reply_rules(self, auto: bool, parallel: bool) -> str:
        calls = 'aegis-calls ::= aegis-call' + (' ("\\n" aegis-call)*' if parallel else '')
        rules = [calls, 'aegis-call ::= "<tool_call>\\n" json-reply "\\n</tool_call>"']
        if auto:
            return "\n".join(['root ::= aegis-calls | aegis-prose | ""', *rules, _PROSE.format(first="<")])
        return "\n".join(["root ::= aegis-calls", *rules])


JSON = FORMATS["json"]
# AEGIS's own format's description, by the name the server's tests and docs have long used
system_text = JSON.system_text
