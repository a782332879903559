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
- `llama3` (Llama 3.1 and later): the tools in the system turn, one JSON function definition ({"type": "function",
  "function": {...}}) per line between LLAMA_INTRO and LLAMA_HOWTO; a call is {"name": NAME, "parameters": {...}}
  (read after an optional <|python_tag|>), several calls separated by "; "; a tool's result is an `ipython` turn of
  its text. The turn ends with <|eot_id|> or <|eom_id|> (the family's end-of-turn tokens).
- `mistral` (Mistral v0.3 and later): [AVAILABLE_TOOLS][definitions][/AVAILABLE_TOOLS] in the system turn (which
  Mistral's template writes into the last user turn); the calls are [TOOL_CALLS][{"name": NAME, "arguments": {...}},
  ...], each with the "id" of 9 letters and digits Mistral's templates give a call in the history (mistral_id); a
  tool's result is a user turn [TOOL_RESULTS]{"content": TEXT, "call_id": ID}[/TOOL_RESULTS] (the [INST] templates
  AEGIS matches have no tool role of their own). Ollama's template data has no call ids: its template writes none.
An assistant turn that called tools is rendered as its text (if any), a newline, then its calls as written.
"""

from __future__ import annotations

import hashlib
import json
import re

from .tool_reader import CallReader

__all__ = ["FORMATS", "JSON", "ToolFormat", "get", "register", "system_text"]

TOOLS_INTRO = (
    "You can call the tools below. Each line describes one tool: its name, what it does and the JSON "
    "Schema of its arguments."
)
CALL_HOWTO = (
    'To call tools, reply with nothing but a JSON object of this form: {"tool_calls": [{"name": '
    '"TOOL_NAME", "arguments": {...}}]}. Each result comes back in a user turn as {"tool_result": '
    '{"name": "TOOL_NAME", "content": "..."}}. Otherwise, reply in plain text.'
)
HERMES_INTRO = (
    "You can call the tools below. The JSON Schema of each one, its name, what it does and its "
    "arguments, is inside <tools></tools>:\n<tools>"
)
HERMES_HOWTO = (
    '</tools>\nTo call a tool, reply with <tool_call>\n{"name": "TOOL_NAME", "arguments": {...}}\n'
    "</tool_call> for each call, one per line, and nothing else. Each result comes back in a user turn "
    "inside <tool_response></tool_response>. Otherwise, reply in plain text."
)
LLAMA_INTRO = "Functions you can call, one JSON definition a line:"
LLAMA_HOWTO = (
    'To call one, reply with nothing but {"name": "FUNCTION_NAME", "parameters": {...}}; several calls: '
    'such objects separated by "; ". Results come back in ipython turns. Otherwise, reply in plain text.'
)
# plain text an `auto` reply may be: it cannot be mistaken for a call (it does not start like one, nor with blank
# space before one); {first} is the character class a call starts with
_PROSE = "aegis-prose ::= [^{first} \\t\\n\\r] [^\\x00]*"
# The same texts in an Ollama Modelfile's Go template: a JSON line per tool of $.Tools, as _described writes them,
# and a call's JSON object, inside `range .ToolCalls`
_GO_TOOLS = (
    '{{ range $.Tools }}\n{"name":{{ json .Function.Name }}'
    '{{ if .Function.Description }},"description":{{ json .Function.Description }}{{ end }}'
    ',"parameters":{{ json .Function.Parameters }}}{{ end }}\n'
)
_GO_CALL = '{"name":{{ json .Function.Name }},"arguments":{{ json .Function.Arguments }}}'


# the same as JSON function definitions ({"type": "function", "function": {...}}), as Llama and Mistral take them
_GO_DEFINITION = (
    '{"type":"function","function":{"name":{{ json .Function.Name }}'
    '{{ if .Function.Description }},"description":{{ json .Function.Description }}{{ end }}'
    ',"parameters":{{ json .Function.Parameters }}}}'
)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _described(tools: list[dict], wrapped: bool = False) -> list[str]:
    """One JSON text per tool: {"name", "description", "parameters"}, or that inside a function definition."""
    plain = [{k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None} for t in tools]
    return [_json({"type": "function", "function": p} if wrapped else p) for p in plain]


def _go_calls(call: str, between: str) -> str:
    """An assistant message's .ToolCalls in Ollama's template, each as `call`, `between` two of them."""
    return "{{ range $j, $c := .ToolCalls }}{{ if $j }}" + between + "{{ end }}" + call + "{{ end }}"


_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def mistral_id(call_id: str) -> str:
    """The call id as Mistral's templates want it, 9 letters and digits: the id itself if it is one, else 9
    characters drawn from its SHA-256 (the same id always gives the same, so a call and its result agree)."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode("utf-8")).digest()
    return "".join(_ALNUM[b % len(_ALNUM)] for b in digest[:9])


class ToolFormat:
    """One tool-call format. `opening` is the text a reply of calls starts with; `depth` is how deep a call object
    ({"name", "arguments"}) sits in the reply's JSON (the reader follows the nesting, not the wrapper text)."""

    name: str
    opening: str
    depth: int
    also: tuple[str, ...] = ()  # other texts a reply of calls may start with
    args_key = "arguments"  # the call object's key for its arguments
    result_role = "user"  # the role of the turn that brings a tool's result back
    prose_first = ""  # GBNF character-class text of the characters plain text may not start with (opening's first)
    # the Modelfile's Go template: the tools' description, an assistant message's .ToolCalls, a tool message
    go_tools: str
    go_calls: str
    go_result: str

    def system_text(self, tools: list[dict]) -> str:
        """The tools on offer, {"name", "description", "parameters"} each, as the system turn describes them."""
        raise NotImplementedError

    def calls_text(self, calls: list[tuple[str, object]], ids: list[str] | None = None) -> str:
        """An assistant turn's calls, (name, parsed arguments) each, as the model writes them; ids: the calls' ids
        (a format that writes ids writes them)."""
        raise NotImplementedError

    def result_text(self, name: str, content: str, call_id: str | None = None) -> str:
        """A tool's result as the turn (of result_role) that brings it back to the model."""
        raise NotImplementedError

    def reply_schema(self, call: dict, parallel: bool) -> dict:
        """The JSON Schema of the reply's JSON, given `call`, the schema of one call (by default a call is its own
        JSON: the format writes each call apart, and reply_rules repeats them)."""
        return call

    def reply_rules(self, auto: bool, parallel: bool) -> str:
        """GBNF rules around the schema's rule `json-reply` ("" when the schema's rule is the root itself)."""
        raise NotImplementedError

    def reader(self) -> CallReader:
        return CallReader((self.opening, *self.also), self.depth, self.args_key)

    def prose(self) -> str:
        """The GBNF rule of plain text an `auto` reply may be instead of calls."""
        return _PROSE.format(first=self.prose_first or self.opening[0])

    def _rules(self, call: str, between: str, auto: bool, parallel: bool) -> str:
        """Rules for a reply of calls, each written as `call` (GBNF around json-reply), `between` two of them."""
        calls = "aegis-calls ::= aegis-call" + (f" ({between} aegis-call)*" if parallel else "")
        rules = [calls, f"aegis-call ::= {call}"]
        if auto:
            return "\n".join(['root ::= aegis-calls | aegis-prose | ""', *rules, self.prose()])
        return "\n".join(["root ::= aegis-calls", *rules])


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
    go_calls = '{"tool_calls":[' + _go_calls(_GO_CALL, ",") + "]}"
    go_result = '{"tool_result":{"name":{{ json .ToolName }},"content":{{ json .Content }}}}'

    def system_text(self, tools: list[dict]) -> str:
        return "\n".join([TOOLS_INTRO, *_described(tools), CALL_HOWTO])

    def calls_text(self, calls: list[tuple[str, object]], ids: list[str] | None = None) -> str:
        return _json({"tool_calls": [{"name": name, "arguments": args} for name, args in calls]})

    def result_text(self, name: str, content: str, call_id: str | None = None) -> str:
        return _json({"tool_result": {"name": name, "content": content}})

    def reply_schema(self, call: dict, parallel: bool) -> dict:
        calls = {"type": "array", "minItems": 1, "items": call, **({} if parallel else {"maxItems": 1})}
        return {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}

    def reply_rules(self, auto: bool, parallel: bool) -> str:
        if not auto:
            return ""
        return 'root ::= json-reply | aegis-prose | ""\n' + self.prose()


@register
class HermesFormat(ToolFormat):
    name, opening, depth = "hermes", "<tool_call>", 1  # each call is an object of its own
    go_tools = HERMES_INTRO + _GO_TOOLS + HERMES_HOWTO
    go_calls = _go_calls("<tool_call>\n" + _GO_CALL + "\n</tool_call>", "\n")
    go_result = "<tool_response>\n{{ .Content }}\n</tool_response>"

    def system_text(self, tools: list[dict]) -> str:
        return "\n".join([HERMES_INTRO, *_described(tools), HERMES_HOWTO])

    def calls_text(self, calls: list[tuple[str, object]], ids: list[str] | None = None) -> str:
        return "\n".join(
            f"<tool_call>\n{_json({'name': name, 'arguments': args})}\n</tool_call>" for name, args in calls
        )

    def result_text(self, name: str, content: str, call_id: str | None = None) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    def reply_rules(self, auto: bool, parallel: bool) -> str:
        return self._rules('"<tool_call>\\n" json-reply "\\n</tool_call>"', '"\\n"', auto, parallel)


@register
class Llama3Format(ToolFormat):
    name, opening, depth, also = "llama3", "{", 1, ("<|python_tag|>",)  # each call is an object of its own
    args_key, result_role, prose_first = "parameters", "ipython", "{<"
    go_tools = LLAMA_INTRO + "{{ range $.Tools }}\n" + _GO_DEFINITION + "{{ end }}\n" + LLAMA_HOWTO
    go_calls = _go_calls('{"name":{{ json .Function.Name }},"parameters":{{ json .Function.Arguments }}}', "; ")
    go_result = "{{ .Content }}"

    def system_text(self, tools: list[dict]) -> str:
        return "\n".join([LLAMA_INTRO, *_described(tools, wrapped=True), LLAMA_HOWTO])

    def calls_text(self, calls: list[tuple[str, object]], ids: list[str] | None = None) -> str:
        return "; ".join(_json({"name": name, "parameters": args}) for name, args in calls)

    def result_text(self, name: str, content: str, call_id: str | None = None) -> str:
        return content

    def reply_rules(self, auto: bool, parallel: bool) -> str:
        return self._rules("json-reply", '"; "', auto, parallel)


@register
class MistralFormat(ToolFormat):
    name, opening, depth = "mistral", "[TOOL_CALLS]", 2  # the list of calls, a call
    prose_first = "\\x5B"  # "[", written so that it cannot close the character class
    go_tools = (
        "[AVAILABLE_TOOLS]["
        + "{{ range $j, $t := $.Tools }}{{ if $j }},{{ end }}"
        + _GO_DEFINITION
        + "{{ end }}][/AVAILABLE_TOOLS]"
    )
    go_calls = "[TOOL_CALLS][" + _go_calls(_GO_CALL, ",") + "]"
    go_result = '[TOOL_RESULTS]{"content":{{ json .Content }}}[/TOOL_RESULTS]'

    def system_text(self, tools: list[dict]) -> str:
        return "[AVAILABLE_TOOLS][" + ",".join(_described(tools, wrapped=True)) + "][/AVAILABLE_TOOLS]"

    def calls_text(self, calls: list[tuple[str, object]], ids: list[str] | None = None) -> str:
        written = [{"name": name, "arguments": args} for name, args in calls]
        for call, call_id in zip(written, ids or []):
            call["id"] = mistral_id(call_id)
        return "[TOOL_CALLS]" + _json(written)

    def result_text(self, name: str, content: str, call_id: str | None = None) -> str:
        result = {"content": content, **({"call_id": mistral_id(call_id)} if call_id else {})}
        return "[TOOL_RESULTS]" + _json(result) + "[/TOOL_RESULTS]"

    def reply_schema(self, call: dict, parallel: bool) -> dict:
        return {"type": "array", "minItems": 1, "items": call, **({} if parallel else {"maxItems": 1})}

    def reply_rules(self, auto: bool, parallel: bool) -> str:
        # one list holds every call: parallel_tool_calls is the list's maxItems (reply_schema)
        return self._rules('"[TOOL_CALLS]" json-reply', "", auto, False)


JSON = FORMATS["json"]
# AEGIS's own format's description, by the name the server's tests and docs have long used
system_text = JSON.system_text
