"""Request bodies of the OpenAI-compatible API (replies: responses.py).

Requests are msgspec Structs decoded strictly from the raw body (`decode`): a value of the wrong JSON type, an
unknown field or a body nested too deeply is a 400 naming the field, never coerced, ignored or a 500. The ranges
are in the types (and so in the OpenAPI schema); what a type cannot say (n > 1, max_tokens against the context, a
schema the grammar cannot enforce) is checked in engine.py, still before anything reaches a backend. Every field
declared here is honoured or refused there with a 400 that names it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .errors import APIError, bad_request

Temperature = Annotated[float, Meta(ge=0.0, le=2.0, description="0 is greedy decoding")]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=0, le=1_000_000, description="extension: keep only the k most likely tokens (0: off)")]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=10_000_000)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1, description="the same seed and request give the same reply")]
N = Annotated[int, Meta(ge=1, le=128, description="completions per request: only 1 is supported (400 otherwise)")]
StopList = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=4)]
ModelId = Annotated[str, Meta(max_length=256)]
IgnoreEos = Annotated[
    bool,
    Meta(
        description="extension: generate through end-of-turn tokens (fixed-length "
        "benchmarks); stop strings and max_tokens still apply"
    ),
]
PromptText = Annotated[str, Meta(min_length=1)]
PromptList = Annotated[
    list[str | int],
    Meta(min_length=1, max_length=1_000_000, description="one string, or token ids of the model's vocabulary"),
]
FunctionName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
JsonObject = Annotated[dict[str, Any], Meta(description="a JSON Schema")]


class Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class TextPart(Strict):
    type: Literal["text"]  # images, audio and files are not supported
    text: str


class FunctionCall(Strict):
    name: FunctionName
    arguments: Annotated[str, Meta(description="the arguments as a JSON object, in text")]


class ToolCall(Strict):
    id: Annotated[str, Meta(max_length=256)]
    type: Literal["function"]
    function: FunctionCall


Content = str | list[TextPart]
Name = Annotated[str, Meta(max_length=256)]
CallId = Annotated[str, Meta(max_length=256)]


class Message(Strict, tag_field="role"):
    """A chat message; `role` picks the kind (its value is the struct's tag)."""

    @property
    def role(self) -> str:
        return self.__struct_config__.tag


class SystemMessage(Message, tag="system"):
    content: Content
    name: Name | None = None


class DeveloperMessage(Message, tag="developer"):
    content: Content
    name: Name | None = None


class UserMessage(Message, tag="user"):
    content: Content
    name: Name | None = None


class AssistantTurn(Message, tag="assistant"):
    content: Content | None = None
    name: Name | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: None = None  # what an SDK echoes back from a reply of ours: always null


class ToolMessage(Message, tag="tool"):
    content: Content
    tool_call_id: CallId


ChatMessage = SystemMessage | DeveloperMessage | UserMessage | AssistantTurn | ToolMessage


class FunctionDef(Strict):
    name: FunctionName
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: FunctionName


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(Strict):
    name: FunctionName
    description: str | None = None
    # a boolean schema is a JSON Schema too: true admits any value, false none (refused as unsatisfiable)
    schema: JsonObject | bool | None = None
    strict: bool | None = None


class TextFormat(Strict, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(Strict, tag_field="type", tag="json_object"):
    pass


class JsonSchemaFormat(Strict, tag_field="type", tag="json_schema"):
    json_schema: JsonSchemaSpec


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    """The fields both completion requests take (OpenAI's names)."""

    model: ModelId | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    max_tokens: MaxTokens | None = None
    stop: str | StopList | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, float], Meta(description="not supported: only {} or null")] | None = None
    n: N | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: IgnoreEos = False
    user: (
        Annotated[str, Meta(max_length=256, description="the end user's id: logged, no effect on the reply")] | None
    ) = None


class ChatCompletionRequest(SamplingRequest, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=4096)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None = None
    tools: Annotated[list[Tool], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[dict[str, Any]], Meta(description="legacy: use tools")] | None = None
    function_call: Annotated[str | dict[str, Any], Meta(description="legacy: use tool_choice")] | None = None


class CompletionRequest(SamplingRequest, kw_only=True):
    prompt: PromptText | PromptList
    best_of: N | None = None
    echo: Annotated[bool, Meta(description="not supported: only false")] | None = None
    suffix: Annotated[str, Meta(description="not supported: only empty")] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    parse_special: Annotated[
        bool,
        Meta(
            description="extension: read control-token text in the prompt (such as "
            "<|user|>) as control tokens; by default it is text"
        ),
    ] = False


def _param(message: str) -> str | None:
    """msgspec's `$.messages[0].role` as OpenAI's `messages[0].role`; an unknown or missing field as its own path."""
    path = message.rpartition(" - at `$")[2].rstrip("`").lstrip(".") if " - at `$" in message else ""
    if message.startswith(("Object contains unknown field `", "Object missing required field `")):
        field = message.split("`")[1]
        return f"{path}.{field}" if path else field
    return path or None


def decode(body: bytes, kind: type[msgspec.Struct]):
    """A request body as `kind`, strictly: APIError 400 for anything else."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        raise bad_request(str(e), _param(str(e))) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="too_deep") from None
