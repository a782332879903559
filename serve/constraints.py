"""What constrains a chat reply: the tools a request offers (tool_choice, parallel_tool_calls) and its
response_format, checked and turned into the grammar (GBNF) its reply is decoded under. A schema or tool the
grammar cannot enforce, or a backend that cannot constrain decoding, is refused with a 400 naming the field, before
anything reaches a backend."""

from __future__ import annotations

from . import structured, tools
from .backends import Backend
from .errors import APIError, bad_request
from .schemas import ChatCompletionRequest, JsonObjectFormat, JsonSchemaFormat, NamedToolChoice


def unsupported(message: str, param: str) -> APIError:
    return bad_request(message, param, "unsupported_parameter")


def tool_plan(req: ChatCompletionRequest) -> tuple[str, list[dict]]:
    """(choice, tools): choice is none | auto | required | a function's name."""
    if req.functions is not None or req.function_call is not None:
        param = "functions" if req.functions is not None else "function_call"
        raise unsupported(
            "the legacy functions/function_call fields are not supported: use tools and tool_choice", param
        )
    defs = []
    for i, t in enumerate(req.tools or []):
        params = t.function.parameters
        where = f"tools[{i}].function.parameters"
        if params is None:  # OpenAI: a function without parameters takes no arguments
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        elif params.get("type") != "object":
            raise bad_request('a function\'s parameters must be a JSON Schema of "type": "object"', where)
        if any(d["name"] == t.function.name for d in defs):
            raise bad_request(f"two tools are named {t.function.name!r}", f"tools[{i}].function.name")
        if t.function.strict and t.function.parameters is not None:
            check_strict(params, where, f"function '{t.function.name}'")
        defs.append(
            {"name": t.function.name, "description": t.function.description, "parameters": params, "param": where}
        )
    choice = req.tool_choice
    if not defs:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        if req.parallel_tool_calls is not None:
            raise bad_request("parallel_tool_calls needs tools", "parallel_tool_calls")
        return "none", []
    if isinstance(choice, NamedToolChoice):
        if all(d["name"] != choice.function.name for d in defs):
            raise bad_request(
                f"tool_choice names {choice.function.name!r}, which is not among the tools", "tool_choice.function.name"
            )
        return choice.function.name, defs
    return choice or "auto", defs


def check_strict(schema, param: str, what: str) -> None:
    """strict: true holds the schema to OpenAI's strict rules, refused in OpenAI's words."""
    try:
        structured.check_strict(schema)
    except RecursionError:
        raise bad_request("the schema is nested too deeply", param) from None
    except structured.StrictError as e:
        raise bad_request(f"Invalid schema for {what}: {e}.", param, "invalid_json_schema") from None


def grammar(backend: Backend, req: ChatCompletionRequest, choice: str, defs: list[dict]) -> tuple[str, object] | None:
    """(GBNF, the backend's compiled form of it) for the reply, None where nothing constrains it."""
    fmt = req.response_format
    if isinstance(fmt, JsonSchemaFormat) and fmt.json_schema.strict and fmt.json_schema.schema is not None:
        check_strict(
            fmt.json_schema.schema, "response_format.json_schema.schema", f"response_format '{fmt.json_schema.name}'"
        )
    constrained = isinstance(fmt, (JsonObjectFormat, JsonSchemaFormat))
    if constrained and choice != "none":
        raise unsupported(
            "response_format json_object/json_schema together with tools needs tool_choice none", "response_format"
        )
    param = "response_format" if constrained else "tools"
    if not constrained and choice == "none":
        return None
    if not backend.supports_grammar:
        raise unsupported(
            f"this model's backend ({backend.kind}) cannot constrain decoding: serve a GGUF file for {param}", param
        )
    try:
        if isinstance(fmt, JsonSchemaFormat):
            param = "response_format.json_schema.schema"
            schema = fmt.json_schema.schema
            grammar = structured.schema_grammar({} if schema is None else schema)
        elif constrained:
            grammar = structured.schema_grammar({"type": "object"})
        else:
            grammar = tools.grammar(defs, choice, req.parallel_tool_calls is not False, backend.tool_format)
    except structured.SchemaLimit as e:
        where = e.param or param
        raise bad_request(f"the schema is beyond a limit at {where}#{e}", where, "schema_too_large") from None
    except structured.SchemaError as e:
        raise unsupported(f"this schema cannot be enforced: {e}", e.param or param) from None
    except RecursionError:
        raise bad_request("the schema is nested too deeply", param) from None
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:  # what the converter refuses
        raise unsupported(f"this schema cannot be turned into a grammar: {e}", param) from None
    compiled = backend.compile_grammar(grammar)
    if compiled is None:
        raise unsupported("this schema cannot be turned into a grammar the decoder accepts", param)
    return grammar, compiled
