"""Structured output through the official openai client: response_format json_object and json_schema constrain
decoding with a llama.cpp grammar, so every reply parses and validates (checked with the jsonschema package over
the schemas below, sampled at temperature 1), streamed or not; a schema the grammar cannot enforce is a 400 that
names the keyword. The served model is the tiny embedded one, whose text is nonsense: only the constraint makes
these replies valid."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from support.fixtures import client, server  # noqa: F401 - fixtures
from support.replies import json_reply
from support.schemas import formatted

USER = [{"role": "user", "content": "今日の予定を JSON で教えてください。"}]
POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}
SCHEMAS = {
    "enum_and_integer": {
        "type": "object",
        "properties": {"city": {"enum": ["東京", "大阪", "札幌"]}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
    "nested_objects": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
                "required": ["name", "age"],
            }
        },
        "required": ["person"],
    },
    "array_of_enums": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4},
    "array_of_objects": {
        "type": "array",
        "minItems": 2,
        "maxItems": 3,
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "tag": {"enum": ["new", "old"]}},
            "required": ["id", "tag"],
        },
    },
    "nested_arrays": {
        "type": "array",
        "maxItems": 3,
        "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}},
        "required": ["code"],
    },
    "pattern_groups": {"type": "string", "pattern": "^(yes|no)-[a-z]{2,4}(_[0-9])?$"},
    "pattern_dot": {"type": "string", "pattern": "^id:.{3}$"},
    "boolean_and_null": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["ok", "nothing"],
    },
    "number": {"type": "object", "properties": {"score": {"type": "number"}}, "required": ["score"]},
    "type_list": {"type": "object", "properties": {"v": {"type": ["integer", "null"]}}, "required": ["v"]},
    "any_of": {
        "anyOf": [{"type": "integer"}, {"type": "object", "properties": {"k": {"const": "x"}}, "required": ["k"]}]
    },
    "const": {
        "type": "object",
        "properties": {"version": {"const": 2}, "kind": {"const": "report"}},
        "required": ["version", "kind"],
    },
    "mixed_enum": {"enum": [1, "two", None, True, {"three": 3}]},
    "formats": formatted(day="date", at="date-time", id="uuid"),
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"enum": ["x", "y"]}, {"type": "boolean"}],
        "items": False,
    },
    "optional_properties": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
        "required": ["a"],
    },
    "no_properties": {"type": "object", "properties": {}, "additionalProperties": False},
    "refs": {
        "$defs": {"point": POINT},
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
    },
    "string_lengths": {
        "type": "object",
        "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 6}},
        "required": ["s"],
    },
    "japanese_keys": {
        "type": "object",
        "properties": {"答え": {"enum": ["はい", "いいえ"]}, "理由": {"type": "string", "maxLength": 10}},
        "required": ["答え", "理由"],
        "title": "回答",
        "description": "annotations are fine",
    },
    "array_in_object": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["赤", "青"]}, "maxItems": 2}},
        "required": ["tags"],
    },
}


def schema_format(schema: dict, strict: bool = False) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": strict}}


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_reply_validates_against_its_schema(client, name):
    schema = SCHEMAS[name]
    for seed in (1, 2):
        jsonschema.validate(json_reply(client, USER, schema_format(schema), seed, 400), schema)


def test_enough_schemas():
    assert len(SCHEMAS) >= 20


def test_without_the_grammar_the_same_requests_do_not_validate(client):
    """The model alone writes nonsense: the validity above is the constraint's doing."""
    failures = 0
    for seed in (1, 2, 3):
        text = (
            client.chat.completions.create(model="tiny", messages=USER, temperature=1.0, seed=seed, max_tokens=60)
            .choices[0]
            .message.content
        )
        try:
            jsonschema.validate(json.loads(text), SCHEMAS["enum_and_integer"])
        except (ValueError, jsonschema.ValidationError):
            failures += 1
    assert failures == 3


def test_json_object_mode_gives_an_object(client):
    finished = 0
    for seed in range(4):
        r = client.chat.completions.create(
            model="tiny",
            messages=USER,
            response_format={"type": "json_object"},
            temperature=1.0,
            seed=seed,
            max_tokens=400,
        )
        text = r.choices[0].message.content
        if r.choices[0].finish_reason == "length":  # the embedded model can write a key of prose that never ends
            assert text.startswith("{") and '"' in text
            continue
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(text), dict)
        finished += 1
    assert finished >= 2


def test_streamed_reply_is_the_same_constrained_text(client):
    args = dict(
        model="tiny",
        messages=USER,
        response_format=schema_format(SCHEMAS["array_of_objects"]),
        temperature=1.0,
        seed=7,
        max_tokens=400,
    )
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **args))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed
    jsonschema.validate(json.loads(streamed), SCHEMAS["array_of_objects"])


@pytest.mark.parametrize(
    "schema, where",
    [
        ({"type": "number", "minimum": 0.2, "maximum": 0.8}, "between the bounds"),
        ({"type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}, "/properties/n/multipleOf"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "/oneOf"),
        ({"allOf": [POINT, {"type": "string"}]}, "/allOf"),
        ({"not": {"minimum": 3}}, "/not"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "/uniqueItems"),
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 1}, "/minProperties"),
        ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, "/patternProperties"),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "integer"}},
                "required": ["b"],
                "additionalProperties": False,
            },
            "/required",
        ),
        ({"type": "string", "format": "hostname"}, "/format"),
        ({"type": "string", "pattern": "^\\d+$"}, "/pattern"),
        ({"type": "string", "pattern": "[a-z]+"}, "/pattern"),
        ({"type": "string", "pattern": "^[^a]$"}, "/pattern"),
        ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "pattern, format and minLength/maxLength"),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "/properties/a/$ref"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "cannot be resolved"),
        ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}}, "/contains"),
    ],
)
def test_schemas_the_grammar_cannot_enforce_are_refused(client, schema, where):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, response_format=schema_format(schema))
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert e.value.body["code"] == "unsupported_parameter"
    assert where in e.value.body["message"]


def test_the_schema_description_reaches_the_model(client):
    fmt = schema_format(SCHEMAS["const"])
    plain = client.chat.completions.create(model="tiny", messages=USER, response_format=fmt, max_tokens=1)
    fmt["json_schema"]["description"] = "会議の報告書の版と種類"
    described = client.chat.completions.create(model="tiny", messages=USER, response_format=fmt, max_tokens=1)
    assert described.usage.prompt_tokens > plain.usage.prompt_tokens + 5  # a system turn with the description


def test_malformed_response_formats_are_400(client):
    for fmt, param in [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "a b"}}, "response_format.json_schema.name"),
        ({"type": "json_object", "schema": {}}, "response_format.schema"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=USER, response_format=fmt)
        assert e.value.body["param"] == param, e.value.body
