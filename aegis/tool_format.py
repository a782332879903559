"""The tool-calling format AEGIS gives models that have none of their own (Phi-3): the text that describes the tools,
an assistant turn's calls and a tool's result. The server writes it into prompts (serve/tools.py, which also holds
the grammar that enforces calls) and the Ollama Modelfile's template writes the same (export/chat_formats.py).

- the tools are described in the system turn: TOOLS_INTRO, one JSON object per tool ({"name", "description",
  "parameters"}) per line, then CALL_HOWTO;
- a call is a reply of nothing but {"tool_calls": [{"name": NAME, "arguments": {...}}, ...]};
- an assistant turn that called tools is rendered as that same JSON (after its text, if it had any, and a newline),
  and a tool's result as a user turn {"tool_result": {"name": NAME, "content": TEXT}}.
"""

from __future__ import annotations

import json

TOOLS_INTRO = ("You can call the tools below. Each line describes one tool: its name, what it does and the JSON "
               "Schema of its arguments.")
CALL_HOWTO = ('To call tools, reply with nothing but a JSON object of this form: {"tool_calls": [{"name": '
              '"TOOL_NAME", "arguments": {...}}]}. Each result comes back in a user turn as {"tool_result": '
              '{"name": "TOOL_NAME", "content": "..."}}. Otherwise, reply in plain text.')


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def system_text(tools: list[dict]) -> str:
    """tools: {"name", "description", "parameters"} each."""
    lines = [_json({k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None})
             for t in tools]
    return "\n".join([TOOLS_INTRO, *lines, CALL_HOWTO])


def calls_text(calls: list[tuple[str, object]]) -> str:
    """An assistant turn's calls, (name, parsed arguments) each, as the model writes them."""
    return _json({"tool_calls": [{"name": name, "arguments": args} for name, args in calls]})


def result_text(name: str, content: str) -> str:
    return _json({"tool_result": {"name": name, "content": content}})
