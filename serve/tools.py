"""Tool calling: the grammar that enforces a model's tool-call format (aegis/tool_format.py; the model's family,
aegis/families/, names the format its chat template uses) and the reader that turns a reply into OpenAI tool calls,
streamed or whole.

Decoding is constrained: `required` and a named function admit only calls (of that function), whose arguments
follow the function's parameters, in the format's own wrapping (and under its own key: Llama's "parameters");
`auto` admits such calls or plain text that cannot be mistaken for a call (it does not start with the format's
opening character, nor with blank space). parallel_tool_calls false admits one call.
"""

from __future__ import annotations

from aegis import tool_format

from . import structured


def grammar(tools: list[dict], choice: str, parallel: bool, fmt: tool_format.ToolFormat = tool_format.JSON) -> str:
    """GBNF for the reply in tool format `fmt`. tools: {"name", "parameters", "param"} each (param: where the
    parameters are in the request, set on the SchemaError when they cannot be enforced); choice: auto | required |
    a function's name."""
    checker = structured.Checker()
    alternatives = []
    if len(tools) > structured.MAX_ALTERNATIVES:
        raise structured.SchemaLimit(
            f"/: {len(tools)} tools, above the limit of {structured.MAX_ALTERNATIVES} per request"
        )
    for t in tools:
        if choice in ("auto", "required") or choice == t["name"]:
            try:
                params = checker.admit(t["parameters"], root_type="object")
            except structured.SchemaError as e:
                e.param = t["param"]
                raise
            # the name first: the reader starts a call at its name, before the arguments stream
            alternatives.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": t["name"]}, fmt.args_key: params},
                    "required": ["name", fmt.args_key],
                }
            )
    schema = fmt.reply_schema({"anyOf": alternatives}, parallel)
    return structured.grammar(schema, checker.defs, fmt.reply_rules(choice == "auto", parallel))
