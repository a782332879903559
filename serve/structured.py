"""Structured output: JSON Schemas turned into llama.cpp grammars (GBNF) that constrain decoding, so a reply always
parses and validates.

llama-cpp-python's converter writes the grammar. It enforces only part of JSON Schema, so every schema is checked
here first: what the grammar enforces passes (annotations dropped), anything else is refused with the keyword and
where it is, never silently loosened. Enforced:

- type (one name, or a list of names with nothing else beside it); const; enum
- objects: properties, required (each a listed property), additionalProperties (true, false or a schema); an
  object with properties admits no other keys unless additionalProperties says so
- arrays: items with minItems/maxItems, or prefixItems (exactly those items)
- strings: one of minLength/maxLength, pattern, or format (date, time, date-time, uuid: their shapes)
- anyOf; $ref to a place in the same schema (recursion included)
- patterns: anchored ^...$, literals, classes such as [a-z0-9_] (not negated), groups, |, ?, *, +, {m,n}, . (any
  character but a quote, a backslash or a control character); the only escapes are of ( ) [ ] { } * + ? | (a dot
  is spelled [.], a digit [0-9])
"""

from __future__ import annotations

import json
import re

from aegis import llamacpp

ANNOTATIONS = frozenset({"title", "description", "examples", "default", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions"})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
FORMATS = frozenset({"date", "time", "date-time", "uuid"})
PY_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
# JSON strings may not hold raw control characters, a quote or a backslash; the converter's own rules let some
# through, so the grammar gets these in their place.
CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
DOT_RULE = r'dot ::= [^"\\\x7F\x00-\x1F]'
DEF_PREFIX = "aegis-def-"


class SchemaError(ValueError):
    """A schema the grammar cannot enforce; the message says what and where (a JSON pointer inside the schema;
    `param`, where set, is the schema's place in the request)."""
    param: str | None = None


def _is_type(value, name: str) -> bool:
    if name in ("number", "integer"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and (name == "number" or float(value).is_integer())
    return isinstance(value, PY_TYPES[name])


class Checker:
    """Checks schemas and gives them back without annotations, every $ref pointing at a definition of its own
    (`#/$defs/aegis-def-N`, collected in `defs`), so several schemas can share one grammar without name clashes."""

    def __init__(self):
        self.defs: dict[str, dict] = {}
        self._named: dict[tuple[int, str], str] = {}

    def clean(self, schema, where: str = "", root=None):
        root = schema if root is None else root
        if schema is True:
            return {}
        if not isinstance(schema, dict):
            raise SchemaError(f"{where or '/'}: a schema must be an object (or true), not {json.dumps(schema)[:40]}")
        keys = set(schema) - ANNOTATIONS
        if "$ref" in schema:
            self._only(keys, {"$ref"}, where, "beside $ref")
            return {"$ref": "#/$defs/" + self._define(schema["$ref"], root, where)}
        if "anyOf" in schema:
            self._only(keys, {"anyOf"}, where, "beside anyOf")
            alts = schema["anyOf"]
            if not isinstance(alts, list) or not alts:
                raise SchemaError(f"{where}/anyOf: must be a non-empty list of schemas")
            return {"anyOf": [self.clean(s, f"{where}/anyOf/{i}", root) for i, s in enumerate(alts)]}
        if "oneOf" in keys or "allOf" in keys:
            word = "oneOf" if "oneOf" in keys else "allOf"
            raise SchemaError(f"{where}/{word}: not supported (the grammar cannot enforce it; use anyOf)")
        kind = schema.get("type")
        if isinstance(kind, list):
            self._only(keys, {"type"}, where, "beside a list of types (use anyOf)")
            if not kind or any(t not in TYPES for t in kind) or len(set(kind)) != len(kind):
                raise SchemaError(f"{where}/type: must list distinct JSON types")
            return {"type": list(kind)}
        if kind is not None and kind not in TYPES:
            raise SchemaError(f"{where}/type: {json.dumps(kind)[:40]} is not a JSON type")
        for word in ("const", "enum"):
            if word in schema:
                self._only(keys, {word, "type"}, where, f"beside {word}")
                values = [schema["const"]] if word == "const" else schema["enum"]
                if word == "enum" and (not isinstance(values, list) or not values):
                    raise SchemaError(f"{where}/enum: must be a non-empty list")
                if kind and not all(_is_type(v, kind) for v in values):
                    raise SchemaError(f"{where}/{word}: a value is not of type {kind}")
                return {word: schema[word]}
        if kind == "object" or (kind is None and keys & {"properties", "required", "additionalProperties"}):
            return self._object(schema, keys, where, root)
        if kind == "array":
            return self._array(schema, keys, where, root)
        if kind == "string":
            return self._string(schema, keys, where)
        if kind is None:
            if keys:
                raise SchemaError(f"{where}/{sorted(keys)[0]}: not supported without a type (the grammar cannot "
                                  f"enforce it)")
            return {}  # any JSON object, the converter's reading of an empty schema
        self._only(keys, {"type"}, where, f"for type {kind}")
        return {"type": kind}

    def _object(self, schema, keys, where, root) -> dict:
        self._only(keys, {"type", "properties", "required", "additionalProperties"}, where, "for objects")
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError(f"{where}/properties: must be an object")
        out = {"type": "object", "properties": {k: self.clean(v, f"{where}/properties/{k}", root)
                                                for k, v in props.items()}}
        required = schema.get("required", [])
        if not isinstance(required, list) or any(r not in props for r in required):
            raise SchemaError(f"{where}/required: must list names under properties")
        if required:
            out["required"] = list(required)
        extra = schema.get("additionalProperties", "absent")
        if isinstance(extra, bool):
            out["additionalProperties"] = extra
        elif extra != "absent":
            out["additionalProperties"] = self.clean(extra, f"{where}/additionalProperties", root)
        if not props and "additionalProperties" not in out:
            return {"type": "object"}
        return out

    def _array(self, schema, keys, where, root) -> dict:
        if "prefixItems" in schema:
            self._only(keys, {"type", "prefixItems"} | ({"items"} if schema.get("items") is False else set()),
                       where, "beside prefixItems")
            items = schema["prefixItems"]
            if not isinstance(items, list) or not items:
                raise SchemaError(f"{where}/prefixItems: must be a non-empty list")
            return {"type": "array", "prefixItems": [self.clean(s, f"{where}/prefixItems/{i}", root)
                                                     for i, s in enumerate(items)]}
        self._only(keys, {"type", "items", "minItems", "maxItems"}, where, "for arrays")
        out = {"type": "array", "items": self.clean(schema.get("items", True), f"{where}/items", root)}
        return self._bounds(schema, out, "minItems", "maxItems", where)

    def _string(self, schema, keys, where) -> dict:
        self._only(keys, {"type", "pattern", "format", "minLength", "maxLength"}, where, "for strings")
        if ("pattern" in keys) + ("format" in keys) + bool(keys & {"minLength", "maxLength"}) > 1:
            raise SchemaError(f"{where}: pattern, format and minLength/maxLength cannot be combined")
        out = {"type": "string"}
        if "pattern" in schema:
            out["pattern"] = check_pattern(schema["pattern"], f"{where}/pattern")
        if "format" in schema:
            if schema["format"] not in FORMATS:
                raise SchemaError(f"{where}/format: {json.dumps(schema['format'])[:40]} is not supported "
                                  f"(only {', '.join(sorted(FORMATS))})")
            out["format"] = schema["format"]
        return self._bounds(schema, out, "minLength", "maxLength", where)

    @staticmethod
    def _bounds(schema: dict, out: dict, low: str, high: str, where: str) -> dict:
        """out with schema's low/high counts (minItems/maxItems, minLength/maxLength), checked."""
        for word in (low, high):
            if word in schema:
                value = schema[word]
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10_000:
                    raise SchemaError(f"{where}/{word}: must be an integer from 0 to 10000")
                out[word] = value
        if out.get(low, 0) > out.get(high, out.get(low, 0)):
            raise SchemaError(f"{where}: {low} is above {high}")
        return out

    @staticmethod
    def _only(keys: set, allowed: set, where: str, context: str) -> None:
        extra = sorted(keys - allowed)
        if extra:
            raise SchemaError(f"{where}/{extra[0]}: not supported {context} (the grammar cannot enforce it)")

    def _define(self, ref, root, where: str) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise SchemaError(f"{where}/$ref: only references inside the schema (#/...) are supported")
        key = (id(root), ref)
        if key not in self._named:
            target = root
            for part in ref[2:].split("/") if ref != "#" else []:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise SchemaError(f"{where}/$ref: {ref} points nowhere")
                target = target[part]
            name = self._named[key] = f"{DEF_PREFIX}{len(self._named)}"
            self.defs[name] = self.clean(target, ref[1:], root)  # named first: recursion finds the name
        return self._named[key]


def check_pattern(pattern, where: str) -> str:
    if not isinstance(pattern, str) or len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$":
        raise SchemaError(f"{where}: a pattern must be anchored, ^...$")
    body, i, depth = pattern[1:-1], 0, 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 >= len(body) or body[i + 1] not in "[](){}*+?|":
                raise SchemaError(f"{where}: the escape at {i + 1} is not supported (write a class such as [0-9])")
            i += 2
            continue
        if c == "[":
            end = body.find("]", i + 1)
            inner = body[i + 1:end]
            if end < 0 or not inner or inner[0] == "^" or any(ch in '"\\' or ord(ch) < 0x20 for ch in inner):
                raise SchemaError(f"{where}: the class at {i + 1} is not supported (no negation, escapes or quotes)")
            i = end + 1
            continue
        if c == "{" and not re.match(r"\{\d+(,\d*)?\}", body[i:]):
            raise SchemaError(f"{where}: the repetition at {i + 1} must be {{m}}, {{m,}} or {{m,n}}")
        if c == "(" and body[i + 1:i + 2] == "?":
            raise SchemaError(f"{where}: (?...) groups are not supported")
        depth += (c == "(") - (c == ")")
        if depth < 0 or c in '^$"' or ord(c) < 0x20 or c == "\x7f":
            raise SchemaError(f"{where}: {c!r} at {i + 1} is not supported inside a pattern")
        i += 1
    if depth:
        raise SchemaError(f"{where}: unbalanced parentheses")
    return pattern


def grammar(schema: dict, defs: dict[str, dict], extra_rules: str = "") -> str:
    """GBNF for a checked schema (Checker.clean) with its definitions; the schema's rule is `root` unless
    extra_rules defines root itself (then the schema's rule is `json-reply`)."""
    name = "json-reply" if extra_rules else ""
    doc = {**schema, "$defs": defs} if defs else schema
    llamacpp.runtime()  # llama.cpp loads the one safe way before its package is imported
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(doc, ""), name)
    text = converter.format_grammar()
    text = re.sub(r"^char ::= .*$", lambda _: CHAR_RULE, text, flags=re.M)
    text = re.sub(r"^dot ::= .*$", lambda _: DOT_RULE, text, flags=re.M)
    return text + ("\n" + extra_rules if extra_rules else "")


def schema_grammar(schema: dict) -> str:
    """GBNF for one user schema (checked here; SchemaError if it cannot be enforced)."""
    checker = Checker()
    cleaned = checker.clean(schema)
    return grammar(cleaned, checker.defs)
