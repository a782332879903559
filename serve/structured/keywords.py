"""The JSON Schema words the grammar knows, and what a cleaned schema admits (for telling oneOf's alternatives
apart)."""

from __future__ import annotations

import json

# words that assert nothing about a value (content* are annotations since draft 7: validators do not check them)
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "examples",
        "default",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
        "$anchor",
        "$vocabulary",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
    }
)
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
FORMATS = frozenset({"date", "time", "date-time", "uuid", "email", "ipv4", "ipv6", "uri"})
# (keyword, exclusive, upper bound)
BOUNDS_HOW = (
    ("minimum", False, False),
    ("exclusiveMinimum", True, False),
    ("maximum", False, True),
    ("exclusiveMaximum", True, True),
)
BOUNDS = frozenset(w for w, _, _ in BOUNDS_HOW)
# the keywords of each type, for a list of types beside keywords: each type gets its own. additionalItems (draft 7)
# applies only past an items list, and the grammar writes exactly that list: it never comes into play.
TYPE_KEYWORDS = {
    "string": {"pattern", "format", "minLength", "maxLength"},
    "integer": BOUNDS | {"multipleOf"},
    "number": BOUNDS | {"multipleOf"},
    "array": {"items", "prefixItems", "minItems", "maxItems", "additionalItems"},
    "object": {"properties", "required", "additionalProperties"},
    "boolean": set(),
    "null": set(),
}
# keywords of one type that the grammar cannot enforce: a schema without a type that uses one is served as the other
# types its keywords name (values of this type are left out, which narrows the output but never breaks it)
UNENFORCED = {
    "array": {"contains", "minContains", "maxContains", "uniqueItems", "unevaluatedItems"},
    "object": {
        "propertyNames",
        "patternProperties",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "minProperties",
        "maxProperties",
        "unevaluatedProperties",
    },
}
PY_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
DEF_PREFIX = "aegis-def-"


def is_type(value, name: str) -> bool:
    if name in ("number", "integer"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and (name == "number" or float(value).is_integer())
    return isinstance(value, PY_TYPES[name])


def domain(schema: dict) -> tuple[str, object] | None:
    """What a cleaned schema admits, where that is plain: ("values", [...]), ("types", [...]) or, for an object
    with required properties of const/enum values (a tag such as "kind": "circle"), ("object", {name: keys});
    None otherwise."""
    if "const" in schema or "enum" in schema:
        return "values", schema["enum"] if "enum" in schema else [schema["const"]]
    if "anyOf" in schema:
        parts = [domain(s) for s in schema["anyOf"]]
        if all(p and p[0] == "types" for p in parts):
            return "types", [t for p in parts for t in p[1]]
        return None
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        tags = {
            name: {value_key(v) for v in domain(props[name])[1]}
            for name in schema.get("required", [])
            if "const" in props[name] or "enum" in props[name]
        }
        if tags:
            return "object", tags
    return ("types", kind if isinstance(kind, list) else [kind]) if kind else None


def value_key(value) -> str:
    """Equal JSON values (1 and 1.0 included) give equal keys; true and 1 do not."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True)


def overlap(a: tuple, b: tuple) -> bool:
    if a[0] == b[0] == "object":  # apart where a tag both require takes no common value
        return all(a[1][name] & b[1][name] for name in a[1].keys() & b[1].keys())
    if "object" in (a[0], b[0]):
        return overlap(("types", ["object"]), b if a[0] == "object" else a)
    if a[0] == b[0] == "values":
        return bool({value_key(v) for v in a[1]} & {value_key(v) for v in b[1]})
    if a[0] == b[0] == "types":
        wide = lambda ts: set(ts) | ({"integer"} if "number" in ts else set())  # noqa: E731
        return bool(wide(a[1]) & wide(b[1]))
    values, types = (a, b) if a[0] == "values" else (b, a)
    return any(is_type(v, t) for v in values[1] for t in types[1])


def disjoint(alts: list[dict]) -> bool:
    """No value can match two of these cleaned schemas (as far as their types and values show)."""
    domains = [domain(s) for s in alts]
    if any(d is None for d in domains):
        return False
    return not any(overlap(a, b) for i, a in enumerate(domains) for b in domains[i + 1 :])
