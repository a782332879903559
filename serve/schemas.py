"""Request and response bodies of the OpenAI-compatible API.

Requests are msgspec Structs with their ranges in the type (Litestar validates them before a handler runs and
publishes them in the OpenAPI schema); what a type cannot say (a lone tool message, n > 1, max_tokens against the
context) is checked in engine.py, still before anything reaches a backend. Unknown fields are ignored, as clients
send fields of newer API versions.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Temperature = Annotated[float, Meta(ge=0.0, le=2.0, description="0 is greedy decoding")]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=0, le=1_000_000, description="extension: keep only the k most likely tokens (0: off)")]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=10_000_000)]
Seed = Annotated[int, Meta(ge=-(2 ** 63), le=2 ** 63 - 1)]
N = Annotated[int, Meta(ge=1, le=1, description="one completion per request (only 1 is supported)")]
StopList = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=4)]
ModelId = Annotated[str, Meta(max_length=256)]
IgnoreEos = Annotated[bool, Meta(description="extension: generate through end-of-turn tokens (fixed-length "
                                             "benchmarks); stop strings and max_tokens still apply")]
PromptText = Annotated[str, Meta(min_length=1)]
PromptList = Annotated[list[str | int], Meta(min_length=1, max_length=1_000_000,
                                             description="one string, or token ids of the model's vocabulary")]
Role = Literal["system", "developer", "user", "assistant"]  # no tool calling here


class TextPart(msgspec.Struct, kw_only=True):
    type: Literal["text"]  # images, audio and files are not supported
    text: str


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Role
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class SamplingRequest(msgspec.Struct, kw_only=True):
    """The fields both completion endpoints take (OpenAI's names)."""
    model: ModelId | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    max_tokens: MaxTokens | None = None
    stop: str | StopList | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    n: N | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: IgnoreEos = False
    user: str | None = None


class ChatCompletionRequest(SamplingRequest, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=4096)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    tools: Annotated[list[dict], Meta(max_length=0, description="not supported")] | None = None


class CompletionRequest(SamplingRequest, kw_only=True):
    prompt: PromptText | PromptList
    best_of: N | None = None
    echo: bool | None = None
    suffix: Annotated[str, Meta(max_length=0, description="not supported")] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=0, description="not supported")] | None = None


# ---- responses ----------------------------------------------------------------------------------------------------

class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct):
    role: str
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    object: str = "text_completion"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    context_length: int
    backend: str
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


class Health(msgspec.Struct):
    status: str
    ready: bool
    models: list[str]
    error: str | None = None
