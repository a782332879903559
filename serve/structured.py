"""Structured output: JSON Schemas turned into llama.cpp grammars (GBNF) that constrain decoding, so a reply always
parses and validates.

llama-cpp-python's converter writes the grammar. It enforces only part of JSON Schema, so every schema is checked
here first: what the grammar enforces passes (annotations dropped), anything else is refused with the keyword and
where it is, never silently loosened. Enforced:

- type (one name, or a list of names; beside a list, each type takes the keywords of its own: a nullable string
  with maxLength); const; enum
- integers: minimum, maximum, exclusiveMinimum, exclusiveMaximum exactly (range rules of our own, range_rule below),
  multipleOf when both bounds are given (the values enumerated, within the enum limits); numbers: the same bounds
  when they are whole numbers (multipleOf only for bounded integers)
- objects: properties, required (each a listed property), additionalProperties (true, false or a schema); an
  object with properties admits no other keys unless additionalProperties says so
- arrays: items with minItems/maxItems, or prefixItems (exactly those items)
- strings: one of minLength/maxLength, pattern, or format (uuid by its shape; date, time, date-time, email, ipv4,
  ipv6, uri by rules of our own below)
- anyOf; oneOf where no value can match two alternatives (distinct types, distinct const/enum values, or objects
  told apart by a required property's const/enum values); allOf
  where the subschemas merge (Checker._merge); $ref to a place in the same schema (recursion included)
- patterns: anchored ^...$, literals, classes such as [a-z0-9_] (not negated), groups, |, ?, *, +, {m,n}, . (any
  character but a quote, a backslash or a control character); the only escapes are of ( ) [ ] { } * + ? | (a dot
  is spelled [.], a digit [0-9])
- formats date, time and date-time are real calendar values (rules of our own, CALENDAR_RULES): years 0001-9999,
  each month's length, Feb 29 only in Gregorian leap years, times 00:00:00-23:59:59 (no leap second), at most six
  fraction digits, Z or an offset up to +-23:59, so every value parses with Python's datetime.fromisoformat

Every schema is also held to the LIMITS below before a grammar is built (SchemaLimit names the keyword and the
limit), so no schema can crash llama.cpp or slow the decoding that every client shares.
"""

from __future__ import annotations

import json
import math
import re

from aegis import llamacpp

ANNOTATIONS = frozenset({"title", "description", "examples", "default", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions"})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
FORMATS = frozenset({"date", "time", "date-time", "uuid", "email", "ipv4", "ipv6", "uri"})
# (keyword, exclusive, upper bound)
BOUNDS_HOW = (("minimum", False, False), ("exclusiveMinimum", True, False), ("maximum", False, True),
              ("exclusiveMaximum", True, True))
BOUNDS = frozenset(w for w, _, _ in BOUNDS_HOW)
# the keywords of each type, for a list of types beside keywords: each type gets its own
TYPE_KEYWORDS = {"string": {"pattern", "format", "minLength", "maxLength"}, "integer": BOUNDS | {"multipleOf"},
                 "number": BOUNDS | {"multipleOf"}, "array": {"items", "prefixItems", "minItems", "maxItems"},
                 "object": {"properties", "required", "additionalProperties"}, "boolean": set(), "null": set()}
PY_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
# JSON strings may not hold raw control characters, a quote or a backslash; the converter's own rules let some
# through, so the grammar gets these in their place.
CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
DOT_RULE = r'dot ::= [^"\\\x7F\x00-\x1F]'
DEF_PREFIX = "aegis-def-"

# ---- limits -------------------------------------------------------------------------------------------------
# What one request's schemas (response_format's, or all its tools' parameters together) may ask of the grammar.
# Why each, as measured on the quickstart model (tests/test_hardening_schema.py keeps the measurements honest):
# - llama.cpp parses a grammar recursively, ~430 bytes of stack per nested group: 8 MB of stack overflows between
#   15 000 and 20 000 nested groups (SIGSEGV: the whole server goes), a 1 MB thread stack between 2 000 and 3 000.
#   The converter writes x{0,n} (and maxLength n, maxItems n) as n nested groups, and llama.cpp refuses more than
#   1 000 of them anyway, but only after recursing through all of them: so no count above MAX_REPEAT gets there.
# - the grammar runs on the decode thread every client shares: each token costs (parse states alive) x vocabulary.
#   A repeated group whose body varies in length keeps a state per way to split the text: ^(a?){0,100}$ and
#   ^(|a){0,100}$ took 0.2-0.6 s per token, ^(a{0,2}){0,50}$ 0.08 s, ^(a{0,10}){0,10}$ 5 ms; hence MAX_GROUP_REPEAT and
#   MAX_REPEAT_PRODUCT (^(a{0,15}){0,15}$: 18 ms mean, 38 ms worst). An enum is one alternative per value, alive
#   while they share a prefix: 1 000 values 35 ms per token (59 worst), 20 000 took seconds per token. Optional
#   properties of one object are alternatives too (500: 19 ms per token) and the converter builds them in
#   quadratic time (500: 1.3 s, 100: 0.03 s).
# - what real applications send fits well within: OpenAI's structured outputs take at most 5 000 properties,
#   10 levels of nesting, 1 000 enum values and 120 000 characters of names and values; agents send up to 128 tools.
#   128 tools of 30 optional parameters each (418 KB) build in 0.5 s into a 1.2 MB grammar of 8 196 rules that
#   llama.cpp takes in 0.06 s (the batched engine makes each request's sampler on the decode thread: that is its
#   share), then 5 ms per token.
MAX_SCHEMA_BYTES = 512 * 1024  # the request's schemas as compact JSON
MAX_DEPTH = 32  # schemas inside schemas (properties, items, anyOf, ... and through $ref), groups inside a pattern
MAX_PROPERTIES = 5_000  # object properties, all objects of the request together
MAX_OPTIONAL_PROPERTIES = 100  # properties one object does not require
MAX_ALTERNATIVES = 128  # branches of one anyOf; tools offered in one request
MAX_ENUM_VALUES = 1_000  # values of one enum
MAX_ENUM_BYTES = 128 * 1024  # enum and const values of the request, as JSON text
MAX_REPEAT = 1_000  # one count: {m,n} in a pattern, minLength/maxLength, minItems/maxItems
MAX_REPEAT_PRODUCT = 256  # counts multiplied through the groups around them in a pattern
MAX_GROUP_REPEAT = 16  # times a pattern group that varies in length (a repetition or | inside) may repeat
MAX_GRAMMAR_BYTES = 4 * 1024 * 1024  # the grammar text llama.cpp parses (a backstop: the limits above keep it lower)
MAX_GRAMMAR_RULES = 20_000


class SchemaError(ValueError):
    """A schema the grammar cannot enforce; the message says what and where (a JSON pointer inside the schema;
    `param`, where set, is the schema's place in the request)."""
    param: str | None = None


class StrictError(SchemaError):
    """A schema sent with strict: true that breaks OpenAI's strict rules (check_strict)."""


class SchemaLimit(SchemaError):
    """A schema beyond one of the limits above; the message names the keyword (its JSON pointer) and the limit."""


def _limit(where: str, what: str, limit: int, unit: str) -> SchemaLimit:
    return SchemaLimit(f"{where or '/'}: {what}, above the limit of {limit:,}{' ' + unit if unit else ''}")


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _is_type(value, name: str) -> bool:
    if name in ("number", "integer"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and (name == "number" or float(value).is_integer())
    return isinstance(value, PY_TYPES[name])


def _domain(schema: dict) -> tuple[str, object] | None:
    """What a cleaned schema admits, where that is plain: ("values", [...]), ("types", [...]) or, for an object
    with required properties of const/enum values (a tag such as "kind": "circle"), ("object", {name: keys});
    None otherwise."""
    if "const" in schema or "enum" in schema:
        return "values", schema["enum"] if "enum" in schema else [schema["const"]]
    if "anyOf" in schema:
        parts = [_domain(s) for s in schema["anyOf"]]
        if all(p and p[0] == "types" for p in parts):
            return "types", [t for p in parts for t in p[1]]
        return None
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        tags = {name: {_value_key(v) for v in _domain(props[name])[1]} for name in schema.get("required", [])
                if "const" in props[name] or "enum" in props[name]}
        if tags:
            return "object", tags
    return ("types", kind if isinstance(kind, list) else [kind]) if kind else None


def _value_key(value) -> str:
    """Equal JSON values (1 and 1.0 included) give equal keys; true and 1 do not."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True)


def _overlap(a: tuple, b: tuple) -> bool:
    if a[0] == b[0] == "object":  # apart where a tag both require takes no common value
        return all(a[1][name] & b[1][name] for name in a[1].keys() & b[1].keys())
    if "object" in (a[0], b[0]):
        return _overlap(("types", ["object"]), b if a[0] == "object" else a)
    if a[0] == b[0] == "values":
        return bool({_value_key(v) for v in a[1]} & {_value_key(v) for v in b[1]})
    if a[0] == b[0] == "types":
        wide = lambda ts: set(ts) | ({"integer"} if "number" in ts else set())  # noqa: E731
        return bool(wide(a[1]) & wide(b[1]))
    values, types = (a, b) if a[0] == "values" else (b, a)
    return any(_is_type(v, t) for v in values[1] for t in types[1])


def _disjoint(alts: list[dict]) -> bool:
    """No value can match two of these cleaned schemas (as far as their types and values show)."""
    domains = [_domain(s) for s in alts]
    if any(d is None for d in domains):
        return False
    return not any(_overlap(a, b) for i, a in enumerate(domains) for b in domains[i + 1:])


class Checker:
    """Checks schemas and gives them back without annotations, every $ref pointing at a definition of its own
    (`#/$defs/aegis-def-N`, collected in `defs`), so several schemas can share one grammar without name clashes.
    One Checker serves one request: the limits that count (bytes, properties, enum values) add up over its schemas."""

    def __init__(self):
        self.defs: dict[str, dict] = {}
        self._named: dict[tuple[int, str], str] = {}
        self.schema_bytes = self.properties = self.enum_bytes = 0

    def admit(self, schema) -> dict:
        """A whole schema of the request: its size counted against MAX_SCHEMA_BYTES, then clean."""
        self._count(schema, "")
        return self.clean(schema)

    def _count(self, schema, where: str) -> None:
        """schema's size against MAX_SCHEMA_BYTES, with every other schema of the request (and every $ref that an
        allOf copies in: merging copies, so the copies count)."""
        try:
            size = len(json.dumps(schema, ensure_ascii=False, separators=(",", ":")).encode())
        except RecursionError:
            raise _limit(where, "the schema is nested too deeply", MAX_DEPTH, "levels") from None
        except (TypeError, ValueError) as e:
            raise SchemaError(f"{where or '/'}: not a JSON schema ({e})") from None
        self.schema_bytes += size
        if self.schema_bytes > MAX_SCHEMA_BYTES:
            raise _limit(where, f"the request's schemas take {self.schema_bytes:,} bytes", MAX_SCHEMA_BYTES,
                         "bytes")

    def clean(self, schema, where: str = "", root=None, depth: int = 0):
        root = schema if root is None else root
        if depth > MAX_DEPTH:
            raise _limit(where, f"schemas nested {depth} deep", MAX_DEPTH, "levels")
        if schema is True:
            return {}
        if not isinstance(schema, dict):
            raise SchemaError(f"{where or '/'}: a schema must be an object (or true), not {json.dumps(schema)[:40]}")
        keys = set(schema) - ANNOTATIONS
        if "$ref" in schema:
            self._only(keys, {"$ref"}, where, "beside $ref")
            return {"$ref": "#/$defs/" + self._define(schema["$ref"], root, where, depth)}
        if "anyOf" in schema:
            self._only(keys, {"anyOf"}, where, "beside anyOf")
            return {"anyOf": self._alternatives(schema["anyOf"], f"{where}/anyOf", root, depth)}
        if "oneOf" in schema:
            self._only(keys, {"oneOf"}, where, "beside oneOf")
            alts = self._alternatives(schema["oneOf"], f"{where}/oneOf", root, depth)
            if not _disjoint(alts):
                raise SchemaError(f"{where}/oneOf: the alternatives may overlap (the grammar enforces oneOf only "
                                  f"where they are of distinct types or distinct values; use anyOf)")
            return {"anyOf": alts}
        if "allOf" in schema:
            return self.clean(self._merge(schema, where, root, depth), where, root, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind or any(t not in TYPES for t in kind) or len(set(kind)) != len(kind):
                raise SchemaError(f"{where}/type: must list distinct JSON types")
            if not keys - {"type"}:
                return {"type": list(kind)}
            if keys & {"const", "enum"}:  # the values of those types
                word = "const" if "const" in keys else "enum"
                values = self.clean({k: v for k, v in schema.items() if k != "type"}, where, root, depth + 1)
                values = [v for v in values.get("enum", [values.get("const")]) if any(_is_type(v, t) for t in kind)]
                if not values:
                    raise SchemaError(f"{where}/{word}: no value is of the types {kind}")
                return {"enum": values}
            self._only(keys, {"type"}.union(*(TYPE_KEYWORDS[t] for t in kind)), where, f"for types {kind}")
            return {"anyOf": [self.clean({"type": t, **{k: schema[k] for k in keys if k in TYPE_KEYWORDS[t]}},
                                         where, root, depth + 1) for t in kind]}
        if kind is not None and kind not in TYPES:
            raise SchemaError(f"{where}/type: {json.dumps(kind)[:40]} is not a JSON type")
        for word in ("const", "enum"):
            if word in schema:
                self._only(keys, {word, "type"}, where, f"beside {word}")
                values = [schema["const"]] if word == "const" else schema["enum"]
                if word == "enum" and (not isinstance(values, list) or not values):
                    raise SchemaError(f"{where}/enum: must be a non-empty list")
                self._values(values, f"{where}/{word}")
                if kind and not all(_is_type(v, kind) for v in values):
                    raise SchemaError(f"{where}/{word}: a value is not of type {kind}")
                return {word: schema[word]}
        if kind == "object" or (kind is None and keys & {"properties", "required", "additionalProperties"}):
            return self._object(schema, keys, where, root, depth)
        if kind == "array":
            return self._array(schema, keys, where, root, depth)
        if kind == "string":
            return self._string(schema, keys, where)
        if kind is None:
            if keys:
                raise SchemaError(f"{where}/{sorted(keys)[0]}: not supported without a type (the grammar cannot "
                                  f"enforce it)")
            return {}  # any JSON object, the converter's reading of an empty schema
        if kind in ("integer", "number"):
            return self._number(schema, keys, kind, where)
        self._only(keys, {"type"}, where, f"for type {kind}")
        return {"type": kind}

    def _number(self, schema, keys, kind, where) -> dict:
        """An integer's bounds as inclusive integers (minimum/maximum of the cleaned schema); a bounded integer
        multipleOf as the enum of its values. A number's bounds must be whole numbers (range_rule can then be exact
        about the decimals): the tighter lower and upper one are kept, open or not."""
        self._only(keys, {"type", *BOUNDS, "multipleOf"}, where, f"for type {kind}")
        out, low, high = {"type": kind}, None, None
        for word, strict, upper in BOUNDS_HOW:
            if word not in schema:
                continue
            value = schema[word]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value \
                    or value in (float("inf"), float("-inf")):
                raise SchemaError(f"{where}/{word}: must be a number")
            if kind == "number" and not float(value).is_integer():
                raise SchemaError(f"{where}/{word}: a number's bound must be a whole number (the grammar bounds "
                                  f"the integer part)")
            if abs(value) >= INT_LIMIT:
                raise _limit(f"{where}/{word}", f"{value:,}", INT_LIMIT, "")
            if kind == "number":  # (bound, open): the tighter one; at a tie the open one
                bound = (int(value), strict)
                if upper:
                    high = bound if high is None else min(high, bound, key=lambda b: (b[0], not b[1]))
                else:
                    low = bound if low is None else max(low, bound, key=lambda b: (b[0], b[1]))
            elif upper:
                bound = math.floor(value) - (1 if strict and float(value).is_integer() else 0)
                high = bound if high is None else min(high, bound)
            else:
                bound = math.ceil(value) + (1 if strict and float(value).is_integer() else 0)
                low = bound if low is None else max(low, bound)
        if kind == "number":
            if "multipleOf" in schema:
                raise SchemaError(f"{where}/multipleOf: supported only for integers with both bounds")
            if low and high and (low[0] > high[0] or low[0] == high[0] and (low[1] or high[1])):
                raise SchemaError(f"{where}: no {kind} lies between the bounds")
            for bound, words in ((low, ("minimum", "exclusiveMinimum")), (high, ("maximum", "exclusiveMaximum"))):
                if bound:
                    out[words[bound[1]]] = bound[0]
            return out
        if low is not None and high is not None and low > high:
            raise SchemaError(f"{where}: no {kind} lies between the bounds")
        if "multipleOf" in schema:
            step = schema["multipleOf"]
            if kind != "integer" or low is None or high is None:
                raise SchemaError(f"{where}/multipleOf: supported only for integers with both bounds")
            if not isinstance(step, (int, float)) or isinstance(step, bool) or not float(step).is_integer() \
                    or step <= 0:
                raise SchemaError(f"{where}/multipleOf: must be a positive whole number")
            step = int(step)
            first = -(-low // step) * step
            count = max(0, (high - first) // step + 1)
            if count > MAX_ENUM_VALUES:
                raise _limit(f"{where}/multipleOf", f"{count:,} values between the bounds", MAX_ENUM_VALUES,
                             "per enum")
            if not count:
                raise SchemaError(f"{where}/multipleOf: no multiple lies between the bounds")
            values = list(range(first, high + 1, step))
            self._values(values, f"{where}/multipleOf")
            return {"enum": values}
        if low is not None:
            out["minimum"] = low
        if high is not None:
            out["maximum"] = high
        return out

    def _alternatives(self, alts, where: str, root, depth: int) -> list:
        """The cleaned schemas of an anyOf or oneOf."""
        if not isinstance(alts, list) or not alts:
            raise SchemaError(f"{where}: must be a non-empty list of schemas")
        if len(alts) > MAX_ALTERNATIVES:
            raise _limit(where, f"{len(alts):,} alternatives", MAX_ALTERNATIVES, "per anyOf")
        return [self.clean(s, f"{where}/{i}", root, depth + 1) for i, s in enumerate(alts)]

    def _merge(self, schema: dict, where: str, root, depth: int) -> dict:
        """One schema for an allOf and the keywords beside it: properties united (a property in several gets an
        allOf of its own), required united, any other keyword in one place only or the same everywhere; an
        additionalProperties other than true only where its schema lists every property of the merge."""
        if depth > MAX_DEPTH:
            raise _limit(where, f"schemas nested {depth} deep", MAX_DEPTH, "levels")
        subs = schema["allOf"]
        if not isinstance(subs, list) or not subs:
            raise SchemaError(f"{where}/allOf: must be a non-empty list of schemas")
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        closed = [(where, merged)] if merged.get("additionalProperties", True) is not True else []
        for i, sub in enumerate(subs):
            at = f"{where}/allOf/{i}"
            if sub is True:
                continue
            if isinstance(sub, dict) and "$ref" in sub and not set(sub) - ANNOTATIONS - {"$ref"}:
                sub = self._target(sub["$ref"], root, f"{at}/$ref")
                self._count(sub, f"{at}/$ref")
            if isinstance(sub, dict) and "allOf" in sub:
                sub = self._merge(sub, at, root, depth + 1)
            if not isinstance(sub, dict):
                raise SchemaError(f"{at}: a schema must be an object (or true), not {json.dumps(sub)[:40]}")
            if sub.get("additionalProperties", True) is not True:
                closed.append((at, sub))
            for key, value in sub.items():
                if key in ANNOTATIONS or key not in merged:
                    merged.setdefault(key, value)
                elif key == "properties" and isinstance(value, dict) and isinstance(merged[key], dict):
                    props = merged[key] = dict(merged[key])
                    for name, prop in value.items():
                        props[name] = prop if props.get(name, prop) == prop else {"allOf": [props[name], prop]}
                elif key == "required" and isinstance(value, list) and isinstance(merged[key], list):
                    merged[key] = merged[key] + [r for r in value if r not in merged[key]]
                elif merged[key] != value:
                    raise SchemaError(f"{where}/allOf: {key} differs between its subschemas (the grammar enforces "
                                      f"allOf only where they merge)")
        for at, sub in closed:
            if set(merged.get("properties", {})) - set(sub.get("properties", {})):
                raise SchemaError(f"{where}/allOf: additionalProperties at {at or '/'} would refuse properties that "
                                  f"another subschema adds (the grammar enforces allOf only where they merge)")
        return merged

    def _values(self, values: list, where: str) -> None:
        """enum/const values against MAX_ENUM_VALUES and (with every other of the request) MAX_ENUM_BYTES."""
        if len(values) > MAX_ENUM_VALUES:
            raise _limit(where, f"{len(values):,} values", MAX_ENUM_VALUES, "per enum")
        try:
            self.enum_bytes += sum(len(json.dumps(v, ensure_ascii=False).encode()) for v in values)
        except RecursionError:
            raise _limit(where, "a value nested too deeply", MAX_DEPTH, "levels") from None
        if self.enum_bytes > MAX_ENUM_BYTES:
            raise _limit(where, f"the request's enum and const values take {self.enum_bytes:,} bytes",
                         MAX_ENUM_BYTES, "bytes")

    def _object(self, schema, keys, where, root, depth) -> dict:
        self._only(keys, {"type", "properties", "required", "additionalProperties"}, where, "for objects")
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError(f"{where}/properties: must be an object")
        self.properties += len(props)
        if self.properties > MAX_PROPERTIES:
            raise _limit(f"{where}/properties", f"the request's schemas have {self.properties:,} properties",
                         MAX_PROPERTIES, "properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or any(not isinstance(r, str) or r not in props for r in required):
            raise SchemaError(f"{where}/required: must list names under properties")
        optional = len(props) - len(set(required))
        if optional > MAX_OPTIONAL_PROPERTIES:
            raise _limit(f"{where}/properties", f"{optional:,} properties are not required",
                         MAX_OPTIONAL_PROPERTIES, "optional properties per object")
        out = {"type": "object", "properties": {k: self.clean(v, f"{where}/properties/{_pointer(k)}", root, depth + 1)
                                                for k, v in props.items()}}
        if required:
            out["required"] = list(required)
        extra = schema.get("additionalProperties", "absent")
        if isinstance(extra, bool):
            out["additionalProperties"] = extra
        elif extra != "absent":
            out["additionalProperties"] = self.clean(extra, f"{where}/additionalProperties", root, depth + 1)
        if not props and "additionalProperties" not in out:
            return {"type": "object"}
        return out

    def _array(self, schema, keys, where, root, depth) -> dict:
        if "prefixItems" in schema:
            self._only(keys, {"type", "prefixItems"} | ({"items"} if schema.get("items") is False else set()),
                       where, "beside prefixItems")
            items = schema["prefixItems"]
            if not isinstance(items, list) or not items:
                raise SchemaError(f"{where}/prefixItems: must be a non-empty list")
            if len(items) > MAX_REPEAT:
                raise _limit(f"{where}/prefixItems", f"{len(items):,} items", MAX_REPEAT, "items")
            return {"type": "array", "prefixItems": [self.clean(s, f"{where}/prefixItems/{i}", root, depth + 1)
                                                     for i, s in enumerate(items)]}
        self._only(keys, {"type", "items", "minItems", "maxItems"}, where, "for arrays")
        out = {"type": "array", "items": self.clean(schema.get("items", True), f"{where}/items", root, depth + 1)}
        return self._bounds(schema, out, "minItems", "maxItems", where)

    def _string(self, schema, keys, where) -> dict:
        self._only(keys, {"type", "pattern", "format", "minLength", "maxLength"}, where, "for strings")
        if ("pattern" in keys) + ("format" in keys) + bool(keys & {"minLength", "maxLength"}) > 1:
            word = sorted(keys & {"minLength", "maxLength", "format"})[-1]
            raise SchemaError(f"{where}/{word}: pattern, format and minLength/maxLength cannot be combined (write "
                              f"the length into the pattern, e.g. ^[a-z]{{1,8}}$)")
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
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise SchemaError(f"{where}/{word}: must be a non-negative integer")
                if value > MAX_REPEAT:
                    raise _limit(f"{where}/{word}", f"{value:,}", MAX_REPEAT, "")
                out[word] = value
        if out.get(low, 0) > out.get(high, out.get(low, 0)):
            raise SchemaError(f"{where}: {low} is above {high}")
        return out

    @staticmethod
    def _only(keys: set, allowed: set, where: str, context: str) -> None:
        extra = sorted(keys - allowed)
        if extra:
            raise SchemaError(f"{where}/{extra[0]}: not supported {context} (the grammar cannot enforce it)")

    @staticmethod
    def _target(ref, root, where: str):
        """The schema a $ref (#/...) points at inside root."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise SchemaError(f"{where}: only references inside the schema (#/...) are supported")
        target = root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{where}: {ref} points nowhere")
            target = target[part]
        return target

    def _define(self, ref, root, where: str, depth: int) -> str:
        target = self._target(ref, root, f"{where}/$ref")
        key = (id(root), ref)
        if key not in self._named:
            name = self._named[key] = f"{DEF_PREFIX}{len(self._named)}"
            # named first: recursion finds the name. A chain of references nests as deep as it is long
            self.defs[name] = self.clean(target, ref[1:], root, depth + 1)
        return self._named[key]


_QUANTIFIER = re.compile(r"[?*+]|\{(\d+)(,(\d*))?\}")


def check_pattern(pattern, where: str) -> str:
    if not isinstance(pattern, str) or len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$":
        raise SchemaError(f"{where}: a pattern must be anchored, ^...$")
    body, i = pattern[1:-1], 0
    # per open group: [the largest count product inside it so far, whether its length varies (it holds a
    # repetition or alternatives: repeated, each way to split the text is a parse state of its own)]
    groups: list[list] = [[1, False]]
    while i < len(body):
        c, atom = body[i], True
        if c == "\\":
            if i + 1 >= len(body) or body[i + 1] not in "[](){}*+?|":
                raise SchemaError(f"{where}: the escape at {i + 1} is not supported (write a class such as [0-9])")
            i += 2
        elif c == "[":
            end = body.find("]", i + 1)
            inner = body[i + 1:end]
            if end < 0 or not inner or inner[0] == "^" or any(ch in '"\\' or ord(ch) < 0x20 for ch in inner):
                raise SchemaError(f"{where}: the class at {i + 1} is not supported (no negation, escapes or quotes)")
            i = end + 1
        elif c == "(":
            if body[i + 1:i + 2] == "?":
                raise SchemaError(f"{where}: (?...) groups are not supported")
            groups.append([1, False])
            if len(groups) > MAX_DEPTH:
                raise _limit(where, f"groups nested {len(groups) - 1} deep at {i + 1}", MAX_DEPTH, "levels")
            i, atom = i + 1, False
        elif c == ")":
            if len(groups) == 1:
                raise SchemaError(f"{where}: unbalanced parentheses")
            inner, repeats = groups.pop()
            i = _quantified(body, i + 1, inner, repeats, groups[-1], where)
            continue
        elif c in "{*+?":
            if c == "{" and not _QUANTIFIER.match(body, i):
                raise SchemaError(f"{where}: the repetition at {i + 1} must be {{m}}, {{m,}} or {{m,n}}")
            raise SchemaError(f"{where}: the repetition at {i + 1} repeats nothing")
        elif c == "|":
            groups[-1][1], atom = True, False
            i += 1
        elif c in '^$"' or ord(c) < 0x20 or c == "\x7f":
            raise SchemaError(f"{where}: {c!r} at {i + 1} is not supported inside a pattern")
        else:
            i += 1
        if atom:
            i = _quantified(body, i, 1, False, groups[-1], where)
    if len(groups) > 1:
        raise SchemaError(f"{where}: unbalanced parentheses")
    return pattern


def _quantified(body: str, i: int, inner: int, repeats: bool, parent: list, where: str) -> int:
    """After an atom or a group (whose largest count product inside is `inner`) at i: its quantifier if any,
    checked against the limits and recorded in the parent group; the index after it."""
    m = _QUANTIFIER.match(body, i) if i < len(body) else None
    if not m:
        parent[0], parent[1] = max(parent[0], inner), parent[1] or repeats
        return i
    if m.group(1) is not None:
        low = int(m.group(1))
        high = low if m.group(2) is None else int(m.group(3)) if m.group(3) else None
        if high is not None and high < low:
            raise SchemaError(f"{where}: the repetition at {i + 1} has its maximum below its minimum")
        count = max(low, high or 0)
    else:
        high = 1 if m.group(0) == "?" else None
        count = 1
    count = max(count, 1 if high == 1 else 2)  # unbounded: at least two ways to split the text
    if count > MAX_REPEAT:
        raise _limit(where, f"the repetition at {i + 1} counts {count:,}", MAX_REPEAT, "")
    if repeats and count > MAX_GROUP_REPEAT:
        raise _limit(where, f"the group before {i + 1} varies in length and repeats {count:,} times",
                     MAX_GROUP_REPEAT, "times")
    product = count * inner
    if product > MAX_REPEAT_PRODUCT and inner > 1:
        raise _limit(where, f"the repetitions nested at {i + 1} multiply to {product:,}", MAX_REPEAT_PRODUCT, "")
    parent[0], parent[1] = max(parent[0], product), True
    if m.end() < len(body) and body[m.end()] in "{*+?":
        raise SchemaError(f"{where}: the repetition at {m.end() + 1} repeats a repetition (use a group)")
    return m.end()


# ---- numeric ranges -----------------------------------------------------------------------------------------
# The converter writes integers as at most 16 digits and knows no bounds: bounded integers and numbers get rules of
# our own. INT_LIMIT stands for "unbounded" on either side, so every range is finite.
INT_LIMIT = 10 ** 16 - 1
FRACTION = '"." [0-9]{1,15}'
NONZERO_FRACTION = '"." [0-9]{0,14} [1-9]'


def _same_length(low: str, high: str) -> list[str]:
    """GBNF alternatives for the digit strings of one length from low to high (low <= high)."""
    if not low:
        return [""]
    if low[0] == high[0]:
        return [f'"{low[0]}" {rest}'.strip() for rest in _same_length(low[1:], high[1:])]
    n = len(low) - 1
    anything = f" [0-9]{{{n}}}" if n else ""
    if low[1:] == "0" * n and high[1:] == "9" * n:
        return [f"[{low[0]}-{high[0]}]{anything}"]
    out = [f'"{low[0]}" {rest}'.strip() for rest in _same_length(low[1:], "9" * n)]
    if int(high[0]) - int(low[0]) > 1:
        out.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}]{anything}")
    out += [f'"{high[0]}" {rest}'.strip() for rest in _same_length("0" * n, high[1:])]
    return out


def _naturals(low: int, high: int) -> list[str]:
    """Alternatives for the integers low..high (0 <= low <= high) written without leading zeros."""
    out = []
    for length in range(len(str(low)), len(str(high)) + 1):
        a, b = max(low, 10 ** (length - 1) if length > 1 else 0), min(high, 10 ** length - 1)
        if a <= b:
            out += _same_length(str(a), str(b))
    return out


def range_rule(low: int | None, high: int | None, low_open: bool = False, high_open: bool = False,
               fractions: bool = False) -> str:
    """GBNF for the integers from low to high (None: unbounded on that side; *_open: the bound itself excluded);
    with fractions, also the decimals I.F (or -I.F) between them: any F where the whole unit interval of I lies
    within, a nonzero F where only its open part does (I = an open bound), so no value written falls outside."""
    low = -INT_LIMIT if low is None else low
    high = INT_LIMIT if high is None else high
    first, last = low + low_open, high - high_open  # the integers
    alts = []

    def add(sign: str, a: int, b: int, tail: str = "") -> None:
        if a <= b:
            alts.append(f'{sign}({" | ".join(_naturals(a, b))}){tail}')

    add('"-" ', max(1, -last), -first)
    add("", max(0, first), last)
    if fractions:
        add('"-" ', max(0, -high + high_open), -low - 1, f" {FRACTION}")
        add("", max(0, low + low_open), high - 1, f" {FRACTION}")
        if high_open and high <= 0 and low <= high - 1:
            add('"-" ', -high, -high, f" {NONZERO_FRACTION}")
        if low_open and low >= 0 and low <= high - 1:
            add("", low, low, f" {NONZERO_FRACTION}")
    return " | ".join(alts)


LITERAL_ESCAPE = re.compile(r'[\\\r\n"]')
LITERAL_ESCAPES = {"\\": "\\\\", "\r": "\\r", "\n": "\\n", '"': '\\"'}


class _Converter:
    """llama-cpp-python's converter with the calendar formats written by our own rules (made lazily: the class
    lives in llama_cpp, which loads only through aegis.llamacpp.runtime())."""
    cls = None

    @classmethod
    def make(cls):
        if cls.cls is None:
            llamacpp.runtime()  # llama.cpp loads the one safe way before its package is imported
            from llama_cpp.llama_grammar import SchemaConverter

            class Converter(SchemaConverter):
                def visit(self, schema, name):
                    fmt = schema.get("format")
                    if schema.get("type") == "string" and fmt in OWN_FORMATS:
                        rule = self._format(fmt)
                        return self._add_rule(name + "-" if name in ("root", "dot") else name or "root",
                                              f'"\\"" {rule} "\\"" space')
                    if schema.get("type") in ("integer", "number") and set(schema) & BOUNDS:
                        rule = range_rule(schema.get("minimum", schema.get("exclusiveMinimum")),
                                          schema.get("maximum", schema.get("exclusiveMaximum")),
                                          "exclusiveMinimum" in schema, "exclusiveMaximum" in schema,
                                          schema["type"] == "number")
                        return self._add_rule(name + "-" if name in ("root", "dot") else name or "root",
                                              f"({rule}) space")
                    return super().visit(schema, name)

                def _format_literal(self, literal: str) -> str:
                    # GBNF reads a backslash in a literal as an escape: the converter's own leaves it bare, so
                    # json.dumps("a\nb") (backslash, n) became a raw newline inside a JSON string
                    return '"' + LITERAL_ESCAPE.sub(lambda m: LITERAL_ESCAPES[m.group(0)], literal) + '"'

                def _format(self, fmt: str) -> str:
                    names = {}
                    for key, text in CALENDAR_RULES + NET_RULES:
                        names[key] = self._add_rule(f"aegis-{key}", text.format(**names))
                        if key == fmt:
                            return names[key]
                    raise AssertionError(fmt)

            cls.cls = Converter
        return cls.cls(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


# RFC 3339 dates and times that Python's datetime reads: years 0001-9999 (year 0 is no Gregorian year and Python
# has none), month lengths, Feb 29 only in leap years (every 4th, not every 100th, every 400th), seconds 00-59 (no
# leap second), at most six fraction digits (microseconds). In dependency order; {name} is a rule named before.
CALENDAR_RULES = [
    ("year", '[0-9] [0-9] [0-9] [1-9] | [0-9] [0-9] [1-9] "0" | [0-9] [1-9] "00" | [1-9] "000"'),
    # the last two digits of a leap year that is not a century (04 ... 96), or a leap century's first two
    ("leap-pair", '"0" [48] | [2468] [048] | [13579] [26]'),
    ("leap-year", '[0-9] [0-9] {leap-pair} | {leap-pair} "00"'),
    ("day-28", '"0" [1-9] | "1" [0-9] | "2" [0-8]'),
    ("month-day", '("01" | "03" | "05" | "07" | "08" | "10" | "12") "-" ({day-28} | "29" | "30" | "31") | '
                  '("04" | "06" | "09" | "11") "-" ({day-28} | "29" | "30") | "02-" {day-28}'),
    ("date", '{year} "-" {month-day} | {leap-year} "-02-29"'),
    ("hour", '[01] [0-9] | "2" [0-3]'),
    ("time", '{hour} ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9] ([0-9] ([0-9] ([0-9] ([0-9] [0-9]?)?)?)?)?)? '
             '("Z" | ("+" | "-") {hour} ":" [0-5] [0-9])'),
    ("date-time", '{date} "T" {time}'),
]


# Internet formats, each a strict subset of its RFC that jsonschema's format checker accepts (Python's ipaddress for
# the addresses): dotted quads without leading zeros; IPv6 as eight groups (no :: shorthand); email as
# dot-separated atoms @ a domain of labels and a letters-only top level; uri as scheme://host[:port] then a path and
# query of unreserved, sub-delims and percent-encoded characters. Lengths bounded so no value runs on forever.
NET_RULES = [
    ("octet", '"25" [0-5] | "2" [0-4] [0-9] | "1" [0-9] [0-9] | [1-9] [0-9] | [0-9]'),
    ("ipv4", '{octet} "." {octet} "." {octet} "." {octet}'),
    ("ipv6", '[0-9a-f]{{1,4}} (":" [0-9a-f]{{1,4}}){{7}}'),
    ("label", '[a-z0-9] ([a-z0-9-]{{0,20}} [a-z0-9])?'),
    ("domain", '{label} ("." {label}){{0,3}} "." [a-z]{{2,10}}'),
    ("email", '[a-zA-Z0-9_%+-]{{1,24}} ("." [a-zA-Z0-9_%+-]{{1,24}}){{0,2}} "@" {domain}'),
    ("uri-char", '[a-zA-Z0-9._~!$&\'()*+,;=:@-] | "%" [0-9A-F] [0-9A-F]'),
    ("uri", '[a-z] [a-z0-9+.-]{{0,15}} "://" {domain} (":" [1-9] [0-9]{{0,3}})? ("/" {uri-char}{{0,24}}){{0,6}} '
            '("?" ({uri-char} | "/" | "?"){{0,32}})?'),
]
OWN_FORMATS = frozenset({"date", "time", "date-time", "ipv4", "ipv6", "email", "uri"})


def grammar(schema: dict, defs: dict[str, dict], extra_rules: str = "") -> str:
    """GBNF for a checked schema (Checker.clean) with its definitions; the schema's rule is `root` unless
    extra_rules defines root itself (then the schema's rule is `json-reply`)."""
    name = "json-reply" if extra_rules else ""
    doc = {**schema, "$defs": defs} if defs else schema
    converter = _Converter.make()
    converter.visit(converter.resolve_refs(doc, ""), name)
    text = converter.format_grammar()
    text = re.sub(r"^char ::= .*$", lambda _: CHAR_RULE, text, flags=re.M)
    text = re.sub(r"^dot ::= .*$", lambda _: DOT_RULE, text, flags=re.M)
    text += "\n" + extra_rules if extra_rules else ""
    rules = text.count("\n") + 1
    if len(text) > MAX_GRAMMAR_BYTES or rules > MAX_GRAMMAR_RULES:
        raise _limit("", f"its grammar would take {len(text):,} bytes in {rules:,} rules", MAX_GRAMMAR_BYTES,
                     f"bytes (and {MAX_GRAMMAR_RULES:,} rules)")
    return text


# where schemas sit inside a schema, for check_strict's walk: keyword -> holds one schema, a list, or a name map
SUBSCHEMAS = {"items": "one", "additionalProperties": "one", "not": "one", "prefixItems": "list", "anyOf": "list",
              "oneOf": "list", "allOf": "list", "properties": "map", "$defs": "map", "definitions": "map"}


def check_strict(schema, where: str = "") -> None:
    """OpenAI's strict mode: every object lists all its properties in required and sets additionalProperties
    false. StrictError names the first object (its JSON pointer) that does not, the way OpenAI words it."""
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        if schema.get("additionalProperties") is not False:
            raise StrictError(f"In context={where or '/'}, 'additionalProperties' is required to be supplied and to "
                              f"be false")
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        missing = [k for k in props if k not in required]
        if missing:
            raise StrictError(f"In context={where or '/'}, 'required' is required to be supplied and to be an array "
                              f"including every key in properties. Missing '{missing[0]}'")
    for key, shape in SUBSCHEMAS.items():
        value = schema.get(key)
        if shape == "one":
            check_strict(value, f"{where}/{key}")
        elif shape == "list" and isinstance(value, list):
            for i, sub in enumerate(value):
                check_strict(sub, f"{where}/{key}/{i}")
        elif shape == "map" and isinstance(value, dict):
            for name, sub in value.items():
                check_strict(sub, f"{where}/{key}/{_pointer(name)}")


def schema_grammar(schema: dict) -> str:
    """GBNF for one user schema (checked here; SchemaError if it cannot be enforced)."""
    checker = Checker()
    cleaned = checker.admit(schema)
    return grammar(cleaned, checker.defs)
