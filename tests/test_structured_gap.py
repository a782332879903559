"""What ordinary applications put in their schemas, enforced by the grammar: numeric bounds, multipleOf, nullable
types beside other keywords, oneOf/allOf where they can be exact, string formats (email, ipv4, ipv6, uri); and the
schemas served narrowed (keywords without a type, if/then/else, not of types, keywords beside oneOf and $ref,
references by $id and $anchor, boolean schemas). Each supported schema is generated through the real server at
temperature 1 with several seeds and validated with the jsonschema package (formats included); each schema that
cannot be exact is a 400 naming its keyword."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from support.fixtures import client, server  # noqa: F401 - fixtures
from support.replies import json_reply

USER = [{"role": "user", "content": "Fill in the form as JSON."}]
CHECK = jsonschema.Draft202012Validator.FORMAT_CHECKER


def obj(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


SCHEMAS = {
    "integer_range": obj(
        n={"type": "integer", "minimum": 1, "maximum": 9}, neg={"type": "integer", "minimum": -40, "maximum": -12}
    ),
    "integer_exclusive": obj(
        n={"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1000},
        m={"type": "integer", "exclusiveMaximum": -5},
        k={"type": "integer", "minimum": 250},
    ),
    "number_range": obj(
        x={"type": "number", "minimum": -2, "maximum": 3},
        y={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 2},
        z={"type": "number", "exclusiveMinimum": -1, "exclusiveMaximum": 0},
    ),
    "multiple_of": obj(n={"type": "integer", "minimum": 0, "maximum": 1000, "multipleOf": 25}),
    "nullable": obj(
        s={"type": ["string", "null"], "maxLength": 4},
        n={"type": ["integer", "null"], "minimum": 5, "maximum": 7},
        e={"type": ["string", "null"], "enum": ["a", None, 3]},
    ),
    "any_of": {"anyOf": [{"type": "integer", "maximum": -3}, {"type": "string", "pattern": "^x[a-z]{2}$"}]},
    "one_of_types": obj(v={"oneOf": [{"type": "boolean"}, {"type": "string", "maxLength": 3}, {"type": "null"}]}),
    "one_of_values": obj(v={"oneOf": [{"const": "on"}, {"enum": ["off", 0]}, {"type": "boolean"}]}),
    "one_of_tagged": {
        "type": "array",
        "minItems": 2,
        "maxItems": 4,
        "items": {
            "oneOf": [
                obj(kind={"const": "circle"}, r={"type": "integer", "minimum": 1, "maximum": 5}),
                obj(kind={"enum": ["square", "rect"]}, side={"type": "integer", "minimum": 1, "maximum": 5}),
                {"type": "string", "maxLength": 3},
            ]
        },
    },
    "all_of": {
        "allOf": [
            {"$ref": "#/$defs/base"},
            {"properties": {"extra": {"type": "integer", "minimum": 0}}, "required": ["extra"]},
        ],
        "$defs": {
            "base": {"type": "object", "properties": {"id": {"type": "integer", "maximum": 9}}, "required": ["id"]}
        },
    },
    "all_of_one_ref": obj(p={"allOf": [{"$ref": "#/$defs/p"}], "description": "as pydantic writes a field"})
    | {"$defs": {"p": obj(x={"enum": [1, 2]})}},
    "formats_mail": obj(mail={"type": "string", "format": "email"}, v4={"type": "string", "format": "ipv4"}),
    "formats_link": obj(v6={"type": "string", "format": "ipv6"}, link={"type": "string", "format": "uri"}),
}
# served narrowed: the grammar admits part of what validates (serve/structured/checker.py says how)
NARROWED = {
    "untyped_keywords": obj(
        n={"minimum": 2, "maximum": 40},
        mail={"format": "email"},
        few={"maxItems": 2},
        word={"pattern": "^[a-z]{2,5}$"},
        even={"multipleOf": 2, "minimum": 0, "maximum": 9},
    ),
    # every type but arrays, whose contains the grammar cannot enforce
    "untyped_mixed": obj(v={"minLength": 2, "maxLength": 4, "minimum": 7, "contains": {"const": 1}}),
    "if_then_else": obj(
        a={"if": {"exclusiveMaximum": 0}, "then": {"minimum": -10}, "else": {"multipleOf": 2}},
        b={"if": False, "then": {"type": "string"}, "else": {"type": "boolean"}},
    ),
    "not_types": obj(v={"not": {"type": ["integer", "string", "object", "array"]}}),
    "beside_one_of": {
        "type": "object",
        "properties": {"kind": {"enum": ["a", "b"]}},
        "required": ["kind"],
        "oneOf": [{"properties": {"kind": {"const": "a"}}}, {"properties": {"kind": {"const": "b"}}}],
    },
    "ref_with_siblings": obj(p={"$ref": "#/$defs/n", "maximum": 5})
    | {"$defs": {"n": {"type": "integer", "minimum": 1}}},
    "ref_by_anchor_and_id": {
        "$id": "https://example.com/root.json",
        "type": "object",
        "properties": {"a": {"$ref": "#item"}, "b": {"$ref": "part.json"}},
        "required": ["a", "b"],
        "additionalProperties": False,
        "$defs": {
            "i": {"$anchor": "item", "type": "integer", "maximum": 3},
            "p": {"$id": "part.json", "enum": ["x", "y"]},
        },
    },
    "fractional_bounds": obj(
        p={"type": "number", "minimum": 0.5, "maximum": 3.75},
        q={"type": "number", "exclusiveMinimum": -2.5, "exclusiveMaximum": 1.5},
    ),
    "required_not_listed": obj(p={"type": "object", "properties": {"a": {"type": "null"}}, "required": ["a", "id"]}),
    "enum_beside_keywords": obj(v={"enum": [1, 5, "abc", "toolong", None], "maximum": 4, "maxLength": 3}),
    "false_property": {"type": "object", "properties": {"a": {"type": "null"}, "gone": False}, "required": ["a"]},
    "tuples": obj(
        t={"type": "array", "prefixItems": [{"type": "integer"}, {"const": "x"}], "items": {"type": "string"}},
        none={"type": "array", "items": False},
    ),
}


def schema_format(schema: dict, strict: bool | None = None) -> dict:
    spec = {"name": "form", "schema": schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


@pytest.mark.parametrize("name", [*SCHEMAS, *NARROWED])
def test_generated_replies_validate(client, name):
    schema = SCHEMAS.get(name, NARROWED.get(name))
    for seed in (1, 2, 3):
        jsonschema.validate(json_reply(client, USER, schema_format(schema), seed, 500), schema, format_checker=CHECK)


@pytest.mark.parametrize(
    "schema, where",
    [
        ({"type": "number", "minimum": 0.5, "exclusiveMaximum": 0.9}, "between the bounds"),
        ({"type": "number", "maximum": 10, "multipleOf": 2}, "/multipleOf"),
        ({"type": "integer", "minimum": 0, "multipleOf": 2}, "/multipleOf"),
        ({"type": "integer", "minimum": 0, "maximum": 100_000, "multipleOf": 3}, "/multipleOf"),
        ({"type": "integer", "minimum": 5, "maximum": 4}, "between the bounds"),
        ({"type": "number", "minimum": 3, "exclusiveMaximum": 3}, "between the bounds"),
        ({"type": "integer", "minimum": 10**20}, "/minimum"),
        ({"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 2}]}, "/oneOf"),
        ({"oneOf": [{"enum": ["a", 1]}, {"const": 1.0}]}, "/oneOf"),
        ({"oneOf": [{"type": "string"}, {"enum": ["a", 1]}]}, "/oneOf"),
        ({"oneOf": [{"type": "object", "properties": {"k": {"const": 1}}}, {"type": "object"}]}, "/oneOf"),
        ({"oneOf": [obj(k={"enum": [1, 2]}), obj(k={"const": 2}, j={"type": "null"})]}, "/oneOf"),
        ({"oneOf": [obj(k={"const": 1}), {"enum": [{"k": 2}]}]}, "/oneOf"),
        ({"allOf": [{"type": "string", "maxLength": 3}, {"type": "string", "maxLength": 4}]}, "/allOf"),
        ({"allOf": [obj(a={"type": "integer"}), obj(b={"type": "integer"})]}, "/allOf"),
        ({"type": ["string", "null"], "maxLength": 3, "minimum": 1}, "/minimum"),
        ({"type": ["string", "null"], "enum": [1, 2]}, "/enum"),
        ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "/maxLength"),
        ({"type": "string", "format": "hostname"}, "/format"),
        (False, "no value is valid"),
        ({"anyOf": [False, False]}, "no value is valid"),
        ({"type": "array", "contains": {"type": "integer"}, "uniqueItems": True}, "/contains"),
        ({"not": {"type": "integer", "minimum": 3}}, "/not"),
        ({"$ref": "https://example.com/other.json"}, "cannot be resolved"),
        ({"type": "object", "properties": {"a": False}, "additionalProperties": True}, "/properties/a"),
    ],
)
def test_what_cannot_be_exact_is_refused_by_name(client, schema, where):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, response_format=schema_format(schema))
    assert where in e.value.body["message"], e.value.body


STRICT_OK = obj(a={"type": "integer"}, b={"type": "array", "items": obj(c={"type": ["string", "null"]})})


@pytest.mark.parametrize(
    "schema, where, word",
    [
        (
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            "context=/,",
            "'additionalProperties'",
        ),
        ({**STRICT_OK, "required": ["a"]}, "context=/,", "Missing 'b'"),
        (
            obj(b={"type": "array", "items": {"type": "object", "properties": {"c": {"type": "string"}}}}),
            "context=/properties/b/items,",
            "'additionalProperties'",
        ),
        (
            obj(d={"$ref": "#/$defs/d"})
            | {
                "$defs": {
                    "d": {"type": "object", "properties": {"e": {"type": "integer"}}, "additionalProperties": False}
                }
            },
            "context=/$defs/d,",
            "Missing 'e'",
        ),
    ],
)
def test_strict_schemas_follow_openais_rules(client, schema, where, word):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, response_format=schema_format(schema, True))
    assert where in e.value.body["message"] and word in e.value.body["message"], e.value.body
    assert e.value.body["message"].startswith("Invalid schema for response_format 'form'")
    assert e.value.body["param"] == "response_format.json_schema.schema"
    tool = {"type": "function", "function": {"name": "act", "parameters": schema, "strict": True}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, tools=[tool])
    assert where in e.value.body["message"] and "function 'act'" in e.value.body["message"], e.value.body
    # the same schema without strict is enforced as it stands
    client.chat.completions.create(
        model="tiny", messages=USER, response_format=schema_format(schema, False), max_tokens=1
    )


def test_a_strict_schema_that_follows_the_rules_is_served(client):
    ping = {"type": "function", "function": {"name": "ping", "strict": True}}  # no parameters: nothing to break
    assert client.chat.completions.create(model="tiny", messages=USER, tools=[ping], max_tokens=1).choices
    finished = 0
    for seed in range(1, 13):  # the tiny model's arrays often run past max_tokens (a third finish): those that end
        r = client.chat.completions.create(
            model="tiny",
            messages=USER,
            response_format=schema_format(STRICT_OK, True),
            temperature=1.0,
            seed=seed,
            max_tokens=300,
        )
        if r.choices[0].finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(r.choices[0].message.content), STRICT_OK)
            if finished == 2:
                break
    assert finished
