"""Tools through the official openai client: tool_choice none / auto / required / a named function, calls whose
arguments validate against the function's parameters (decoding is constrained), tool-call deltas streamed as OpenAI
streams them, and an agent loop: call -> tool result -> final answer; then the same for every family's tool format
(Llama 3's, Mistral's, Hermes), the tiny model served with that family's chat template. The tiny model's choices are
nonsense; the tests rely on the constraint, the format and the seed, not on the model being smart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import openai
import pytest

from aegis import chat_template, families as registry, tool_format
from aegis.tool_reader import CallReader
from support import serving
from support.fixtures import client, server  # noqa: F401 - fixtures

USER = [
    {"role": "system", "content": "あなたは天気を調べるアシスタントです。"},
    {"role": "user", "content": "東京の明日の天気は？"},
]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["東京", "大阪", "札幌"]},
        "days": {"type": "integer"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days"],
}
CLOCK = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]{2,8}/[A-Z][a-z]{2,8}$"}},
    "required": ["zone"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "都市の天気予報", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "現在時刻", "parameters": CLOCK}},
    {"type": "function", "function": {"name": "ping", "description": "no arguments"}},
]
PARAMS = {
    "get_weather": WEATHER,
    "get_time": CLOCK,
    "ping": {"type": "object", "properties": {}, "additionalProperties": False},
}


def call(client, **kwargs):
    args = (
        dict(model="tiny", messages=USER, tools=TOOLS, temperature=1.0, max_tokens=300, parallel_tool_calls=False)
        | kwargs
    )
    return client.chat.completions.create(**args)


def check_calls(message, names=tuple(PARAMS)) -> None:
    assert message.content is None and message.tool_calls
    for c in message.tool_calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


def test_required_always_calls_a_tool_with_valid_arguments(client):
    # which tool is the model's choice (the embedded model nearly always takes "ping"); each one is reachable, as the
    # named-function test shows
    for seed in range(6):
        r = call(client, tool_choice="required", seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls(r.choices[0].message)
        assert len(r.choices[0].message.tool_calls) == 1  # parallel_tool_calls false


def test_a_named_function_is_the_one_called(client):
    for name in PARAMS:
        for seed in range(2):
            r = call(client, tool_choice={"type": "function", "function": {"name": name}}, seed=seed)
            check_calls(r.choices[0].message, names=(name,))


def test_parallel_calls_when_allowed(client):
    r = call(client, tool_choice="required", seed=3, parallel_tool_calls=True, max_tokens=400)
    if r.choices[0].finish_reason == "length":  # the nonsense model keeps calling; the last call was cut short,
        assert r.choices[0].message.tool_calls is None  # so the reply is its text, never calls that do not parse
        reader = CallReader()
        reader.feed(r.choices[0].message.content)
        calls = [(c.name, c.arguments) for c in reader.calls[:-1]]
    else:
        calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
    assert len(calls) > 1
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), PARAMS[name])


def test_a_call_cut_by_max_tokens_is_text_with_finish_reason_length(client):
    args = dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=11, max_tokens=60)
    r = call(client, **args)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content.startswith("{") and "arguments" in r.choices[0].message.content
    chunks = list(call(client, stream=True, **args))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_auto_is_text_or_valid_calls(client):
    # which the nonsense model picks is its business (it writes text); either is well formed
    for seed in range(6):
        message = call(client, seed=seed, max_tokens=60).choices[0].message
        if message.tool_calls:
            check_calls(message)
        else:
            assert not message.content.startswith(("{", " ", "\n"))


def test_none_describes_no_tools_and_calls_none(client):
    with_none = call(client, tool_choice="none", seed=1, max_tokens=20)
    plain = client.chat.completions.create(model="tiny", messages=USER, temperature=1.0, seed=1, max_tokens=20)
    assert with_none.choices[0].message.tool_calls is None
    assert with_none.usage.prompt_tokens == plain.usage.prompt_tokens  # the tools are not in the prompt
    assert with_none.choices[0].message.content == plain.choices[0].message.content
    described = call(client, tool_choice="auto", seed=1, max_tokens=1)
    assert described.usage.prompt_tokens > plain.usage.prompt_tokens + 50


def test_tool_calls_stream_as_deltas(client):
    args = dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=11)
    whole = call(client, **args).choices[0].message.tool_calls[0]
    chunks = list(call(client, stream=True, **args))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == whole.function.name and first.function.arguments == ""
    assert len(rest) > 3 and all(d.id is None and d.function.name is None for d in rest)  # really streamed
    assert "".join(d.function.arguments for d in rest) == whole.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def get_weather(city: str, days: int, unit: str = "celsius") -> str:
    return json.dumps({"city": city, "in_days": days, "forecast": "晴れ", "high": 21, "unit": unit}, ensure_ascii=False)


def test_agent_loop_call_result_answer(client, server):
    messages = list(USER)
    first = call(
        client, messages=messages, tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=5
    )
    assert first.choices[0].finish_reason == "tool_calls"
    messages.append(first.choices[0].message)  # the SDK's own message object goes back, as apps do
    for c in first.choices[0].message.tool_calls:
        result = get_weather(**json.loads(c.function.arguments))
        messages.append({"role": "tool", "tool_call_id": c.id, "content": result})
    final = call(client, messages=messages, tool_choice="none", seed=5, max_tokens=40)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content and final.choices[0].finish_reason in ("stop", "length")
    # the call and its result were rendered for the next turn, in the documented format
    history = [
        {"role": "system", "content": USER[0]["content"]},
        USER[1],
        {
            "role": "assistant",
            "content": tool_format.JSON.calls_text(
                [("get_weather", json.loads(first.choices[0].message.tool_calls[0].function.arguments))]
            ),
        },
        {"role": "user", "content": tool_format.JSON.result_text("get_weather", messages[-1]["content"])},
    ]
    rendered = client.completions.create(
        model="tiny", prompt=render_phi3(history), max_tokens=1, extra_body={"parse_special": True}
    )
    assert final.usage.prompt_tokens == rendered.usage.prompt_tokens


def render_phi3(messages) -> str:
    """The embedded model's chat template, written out (what the Phi-3 template renders)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages) + "<|assistant|>\n"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(tool_choice={"type": "function", "function": {"name": "nowhere"}}), "tool_choice.function.name"),
        (
            dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
            "tools[0].function.parameters",
        ),
        (
            dict(
                tools=[
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"n": {"type": "array", "uniqueItems": True}},
                            },
                        },
                    }
                ]
            ),
            "tools[0].function.parameters",
        ),
        (dict(tools=[TOOLS[0], TOOLS[0]]), "tools[1].function.name"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name"),
        (dict(tools=None, tool_choice="required"), "tool_choice"),
        (dict(tools=None, parallel_tool_calls=True), "parallel_tool_calls"),
        (dict(response_format={"type": "json_object"}), "response_format"),
        (dict(extra_body={"functions": [{"name": "f"}]}), "functions"),
        (dict(extra_body={"function_call": "auto"}), "function_call"),
        (
            dict(messages=USER + [{"role": "tool", "tool_call_id": "call_x", "content": "?"}]),
            "messages[2].tool_call_id",
        ),
        (
            dict(
                messages=USER
                + [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{not json"},
                            }
                        ],
                    }
                ]
            ),
            "messages[2].tool_calls[0].function.arguments",
        ),
        (dict(messages=USER + [{"role": "assistant"}]), "messages[2].content"),
    ],
)
def test_tool_requests_that_cannot_be_honoured_are_400(client, kwargs, param):
    args = dict(model="tiny", messages=USER, tools=TOOLS, max_tokens=4) | kwargs
    args = {k: v for k, v in args.items() if v is not None}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.body["param"] == param, e.value.body


# ---- every family's tool format, through the same tiny model -----------------------------------------------------
# The embedded model's GGUF with a family's chat template instead of its own: the server finds the family by the
# template and speaks its tool format (Llama 3's, Mistral's, Hermes). The vocabulary stays the tiny model's, so the
# format's markers are plain text; what is proven is the format: its prompt, its grammar, its reader.

FORMATS = [name for name, f in registry.FAMILIES.items() if f.tool_format is not tool_format.JSON]


def _with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of a GGUF whose tokenizer.chat_template is `template` (gguf-py's own metadata copier)."""
    (dst.parent / "template.jinja").write_text(template, encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gguf.scripts.gguf_new_metadata",
            "--force",
            "--chat-template-file",
            str(dst.parent / "template.jinja"),
            str(src),
            str(dst),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return dst


@pytest.fixture(scope="module", params=FORMATS)
def family_client(request, tmp_path_factory):
    family = registry.FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    gguf = _with_template(serving.served_files(request)[0], root / f"{family.name}.gguf", family.chat_template)
    with serving.Server(
        "--model", f"tiny={gguf}", "--no-verify", "--threads", "1", "--ctx-size", "2048", log_path=root / "serve.log"
    ) as s:
        yield family.tool_format, serving.openai_client(s)
        assert s.alive(), s.log()


def _written(choice) -> str:
    """What the model wrote, token by token (read back through logprobs)."""
    return b"".join(bytes(t.bytes) for t in choice.logprobs.content).decode()


def test_each_format_calls_whole_and_streamed(family_client):
    """required, a named function and parallel calls: the model writes them in the family's format (its own text,
    read back through logprobs), the SDK gets calls whose arguments validate, and a streamed reply's deltas build
    the same calls as the whole one."""
    fmt, client = family_client
    for seed in range(3):
        choice = call(client, tool_choice="required", seed=seed, logprobs=True).choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        check_calls(choice.message)
        assert _written(choice).startswith(fmt.opening), _written(choice)
    for name in PARAMS:
        named = dict(tool_choice={"type": "function", "function": {"name": name}}, seed=11)
        whole = call(client, **named).choices[0].message
        check_calls(whole, names=(name,))
        chunks = list(call(client, stream=True, **named))
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
        assert deltas[0].function.name == name and deltas[0].id.startswith("call_")
        assert "".join(d.function.arguments or "" for d in deltas) == whole.tool_calls[0].function.arguments
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "tool_calls"
        ]
    most = 0  # parallel calls allowed: the model (its choice, by seed: about one reply in twenty) writes several
    for seed in range(60):
        many = call(client, tool_choice="required", seed=seed, parallel_tool_calls=True, max_tokens=300).choices[0]
        if many.finish_reason == "length":  # the last call cut short: the reply is text, its whole calls read back
            assert many.message.tool_calls is None
            reader = fmt.reader()
            reader.feed(many.message.content)
            calls = [(c.name, c.arguments) for c in reader.calls[:-1]]
        else:
            calls = [(c.function.name, c.function.arguments) for c in many.message.tool_calls]
        for name, arguments in calls:
            jsonschema.validate(json.loads(arguments), PARAMS[name])
        most = max(most, len(calls))
        if most > 1:
            break
    assert most > 1


def test_each_format_auto_none_and_cut(family_client):
    """auto is text that does not start like a call, or valid calls; none describes no tools; a call cut by
    max_tokens is text (non-streamed) with finish_reason length, never tool_calls."""
    fmt, client = family_client
    for seed in range(3):
        message = call(client, seed=seed, max_tokens=40).choices[0].message
        if message.tool_calls:
            check_calls(message)
        else:
            assert not message.content.startswith((fmt.opening, *fmt.also, " ", "\n")), message.content
    plain = client.chat.completions.create(model="tiny", messages=USER, temperature=1.0, seed=1, max_tokens=8)
    none = call(client, tool_choice="none", seed=1, max_tokens=8)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens and none.choices[0].message.tool_calls is None
    named = dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=11)
    whole = call(client, logprobs=True, **named).choices[0]
    n = len(whole.logprobs.content)
    for cut in (n // 2, n - 1):
        r = call(client, max_tokens=cut, **named).choices[0]
        assert r.finish_reason == "length" and r.message.tool_calls is None, (cut, r.message)
        assert _written(whole).startswith(r.message.content)
        chunks = list(call(client, max_tokens=cut, stream=True, **named))
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_each_format_round_trips_a_call_and_its_result(family_client):
    """The SDK's message with tool_calls and a tool result go back, and the server writes both in the family's
    format (Llama's ipython turn, Mistral's [TOOL_RESULTS] with the call's 9-character id): the prompt is exactly
    the family's chat template over those texts."""
    fmt, client = family_client
    family = next(f for f in registry.FAMILIES.values() if f.tool_format is fmt)
    first = call(client, tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=5)
    (made,) = first.choices[0].message.tool_calls
    result = get_weather(**json.loads(made.function.arguments))
    messages = [*USER, first.choices[0].message, {"role": "tool", "tool_call_id": made.id, "content": result}]
    final = call(client, messages=messages, tool_choice="none", seed=5, max_tokens=8)
    assert final.choices[0].message.tool_calls is None
    history = [
        *USER,
        {
            "role": "assistant",
            "content": fmt.calls_text([(made.function.name, json.loads(made.function.arguments))], [made.id]),
        },
        {"role": fmt.result_role, "content": fmt.result_text(made.function.name, result, made.id)},
    ]
    text = chat_template.render(family.chat_template, history, {"bos_token": "<s>", "eos_token": "<|endoftext|>"})
    rendered = client.completions.create(model="tiny", prompt=text, max_tokens=1, extra_body={"parse_special": True})
    assert final.usage.prompt_tokens == rendered.usage.prompt_tokens
