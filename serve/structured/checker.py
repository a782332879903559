"""Checker: a request's schemas held to the limits and rewritten into the subset the grammar writes.

A grammar may admit any part of what a schema validates, never more. So where a schema asks for more than the
grammar can say, the rewrite narrows it, never widens it: a schema without a type is served as the types its
keywords name; if/then/else as the if and then branch (or else, when if is false); keywords beside anyOf, oneOf and
$ref join each alternative (allOf). What cannot be narrowed that way is refused with its keyword's JSON pointer.
"""

from __future__ import annotations

import json

import jsonschema
import referencing.jsonschema
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable

from . import kinds
from .keywords import ANNOTATIONS, DEF_PREFIX, TYPE_KEYWORDS, TYPES, UNENFORCED, disjoint
from .limits import (
    MAX_ALTERNATIVES,
    MAX_DEPTH,
    MAX_ENUM_BYTES,
    MAX_ENUM_VALUES,
    MAX_PROPERTIES,
    MAX_SCHEMA_BYTES,
    SchemaError,
    SchemaLimit,
    limit,
)
from .merge import merge

ROOT_URI = "urn:aegis:schema"  # the base of a schema without an $id of its own
CONDITIONAL = ("if", "then", "else")
FORMATS_CHECKED = jsonschema.Draft202012Validator.FORMAT_CHECKER


def _scope(schema) -> referencing.Resolver | None:
    """The resolver for $ref inside schema: its own document only ($defs, JSON pointers, $id, $anchor), never a
    fetch."""
    if not isinstance(schema, dict):
        return None
    try:
        resource = Resource.from_contents(schema, default_specification=referencing.jsonschema.DRAFT202012)
    except Exception:  # an unknown $schema: read as draft 2020-12
        resource = referencing.jsonschema.DRAFT202012.create_resource(schema)
    base = resource.id() if isinstance(resource.id(), str) else ROOT_URI
    return Registry().with_resource(base, resource).resolver(base_uri=base)


class Checker:
    """Checks schemas and gives them back without annotations, every $ref pointing at a definition of its own
    (`#/$defs/aegis-def-N`, collected in `defs`), so several schemas can share one grammar without name clashes.
    One Checker serves one request: the limits that count (bytes, properties, enum values) add up over its schemas."""

    def __init__(self):
        self.defs: dict[str, dict] = {}
        self._named: dict[int, str] = {}
        self._held: list = []  # the targets named, so their ids stay theirs
        self.schema_bytes = self.properties = self.enum_bytes = 0

    def admit(self, schema, root_type: str | None = None) -> dict:
        """A whole schema of the request: its size counted against MAX_SCHEMA_BYTES, then clean. root_type: the type
        the whole must have where the schema names none (a tool's arguments are an object)."""
        self.count(schema, "")
        if root_type and isinstance(schema, dict) and "type" not in schema:
            schema = {**schema, "type": root_type}
        return self.clean(schema, "", _scope(schema))

    def count(self, schema, where: str) -> None:
        """schema's size against MAX_SCHEMA_BYTES, with every other schema of the request (and every $ref that an
        allOf copies in: merging copies, so the copies count)."""
        try:
            size = len(json.dumps(schema, ensure_ascii=False, separators=(",", ":")).encode())
        except RecursionError:
            raise limit(where, "the schema is nested too deeply", MAX_DEPTH, "levels") from None
        except (TypeError, ValueError) as e:
            raise SchemaError(f"{where or '/'}: not a JSON schema ({e})") from None
        self.schema_bytes += size
        if self.schema_bytes > MAX_SCHEMA_BYTES:
            raise limit(where, f"the request's schemas take {self.schema_bytes:,} bytes", MAX_SCHEMA_BYTES, "bytes")

    def count_properties(self, n: int, where: str) -> None:
        self.properties += n
        if self.properties > MAX_PROPERTIES:
            raise limit(
                where, f"the request's schemas have {self.properties:,} properties", MAX_PROPERTIES, "properties"
            )

    def values(self, values: list, where: str) -> None:
        """enum/const values against MAX_ENUM_VALUES and (with every other of the request) MAX_ENUM_BYTES."""
        if len(values) > MAX_ENUM_VALUES:
            raise limit(where, f"{len(values):,} values", MAX_ENUM_VALUES, "per enum")
        try:
            self.enum_bytes += sum(len(json.dumps(v, ensure_ascii=False).encode()) for v in values)
        except RecursionError:
            raise limit(where, "a value nested too deeply", MAX_DEPTH, "levels") from None
        if self.enum_bytes > MAX_ENUM_BYTES:
            raise limit(
                where, f"the request's enum and const values take {self.enum_bytes:,} bytes", MAX_ENUM_BYTES, "bytes"
            )

    def clean(self, schema, where: str = "", scope=None, depth: int = 0):
        if depth > MAX_DEPTH:
            raise limit(where, f"schemas nested {depth} deep", MAX_DEPTH, "levels")
        if schema is True:
            return {}
        if schema is False:
            raise SchemaError(f"{where or '/'}: false, so no value is valid")
        if not isinstance(schema, dict):
            raise SchemaError(f"{where or '/'}: a schema must be an object (or true), not {json.dumps(schema)[:40]}")
        if depth and scope is not None and isinstance(schema.get("$id"), str):
            scope = scope.in_subresource(referencing.jsonschema.DRAFT202012.create_resource(schema))
        keys = set(schema) - ANNOTATIONS
        rewritten = self._rewrite(schema, keys, where)
        if rewritten is not None:
            return self.clean(rewritten, where, scope, depth + 1)
        if "$ref" in schema:
            return {"$ref": "#/$defs/" + self._define(schema["$ref"], scope, where, depth)}
        if "anyOf" in schema or "oneOf" in schema:
            return self._choice(schema, where, scope, depth)
        if "allOf" in schema:
            return self.clean(self._merge(schema, where, scope, depth), where, scope, depth + 1)
        for word in ("const", "enum"):
            if word in schema:
                return self._values_of(schema, keys, word, where)
        kind = schema.get("type")
        if kind is None:
            return self._untyped(schema, keys, where, scope, depth)
        return self._typed(schema, keys, kind, where, scope, depth)

    def _typed(self, schema: dict, keys: set, kind, where: str, scope, depth: int) -> dict:
        if isinstance(kind, list):
            if not kind or any(t not in TYPES for t in kind) or len(set(kind)) != len(kind):
                raise SchemaError(f"{where}/type: must list distinct JSON types")
            if len(kind) == 1:
                return self._typed({**schema, "type": kind[0]}, keys, kind[0], where, scope, depth)
            if not keys - {"type"}:
                return {"type": list(kind)}
            kinds.only(keys, {"type"}.union(*(TYPE_KEYWORDS[t] for t in kind)), where, f"for types {kind}")
            return {
                "anyOf": [
                    self.clean(
                        {"type": t, **{k: schema[k] for k in keys if k in TYPE_KEYWORDS[t]}}, where, scope, depth + 1
                    )
                    for t in kind
                ]
            }
        if kind not in TYPES:
            raise SchemaError(f"{where}/type: {json.dumps(kind)[:40]} is not a JSON type")
        if kind == "object":
            return kinds.obj(self, schema, keys, where, scope, depth)
        if kind == "array":
            return kinds.array(self, schema, keys, where, scope, depth)
        if kind == "string":
            return kinds.string(schema, keys, where)
        if kind in ("integer", "number"):
            return kinds.number(self, schema, keys, kind, where)
        kinds.only(keys, {"type"}, where, f"for type {kind}")
        return {"type": kind}

    def _values_of(self, schema: dict, keys: set, word: str, where: str) -> dict:
        """const or enum; beside other keywords, the values that validate against them (exact: each value is
        checked as the schema says)."""
        values = [schema["const"]] if word == "const" else schema["enum"]
        if word == "enum" and (not isinstance(values, list) or not values):
            raise SchemaError(f"{where}/enum: must be a non-empty list")
        self.values(values, f"{where}/{word}")
        rest = {k: schema[k] for k in keys - {word}}
        if not rest:
            return {word: schema[word]}
        text = json.dumps(rest)
        if '"$ref"' in text or '"$dynamicRef"' in text or '"pattern' in text:
            # a reference reads against the whole schema; a pattern would run Python's regex engine on the values
            word_beside = sorted(rest)[0]
            raise SchemaError(f"{where}/{word_beside}: not supported beside {word} (the grammar cannot enforce it)")
        try:
            validator = jsonschema.Draft202012Validator(rest, format_checker=FORMATS_CHECKED)
            kept = [v for v in values if validator.is_valid(v)]
        except Exception as e:  # the keywords beside are not a schema jsonschema reads
            raise SchemaError(f"{where}: the keywords beside {word} are not a valid schema ({str(e)[:80]})") from None
        if not kept:
            raise SchemaError(f"{where}/{word}: no value validates against the keywords beside it")
        return {"enum": kept}

    def _untyped(self, schema: dict, keys: set, where: str, scope, depth: int) -> dict:
        """A schema without a type admits every type, each held to its own keywords: anyOf over the types. A type
        whose keywords the grammar cannot enforce is left out (a number also tries as an integer first), which
        narrows the output but never breaks it; boolean and null take no keywords, so something always remains."""
        unknown = sorted(keys - set().union(*TYPE_KEYWORDS.values(), *UNENFORCED.values()))
        if unknown:
            raise SchemaError(f"{where}/{unknown[0]}: not supported (the grammar cannot enforce it)")
        parts, plain = [], True
        for kind in ("object", "array", "string", "number", "boolean", "null"):
            words = keys & (TYPE_KEYWORDS[kind] | UNENFORCED.get(kind, set()))
            plain = plain and not words
            if words & UNENFORCED.get(kind, set()):
                continue
            for name in (kind, "integer") if kind == "number" else (kind,):
                try:
                    parts.append(
                        self._typed(
                            {"type": name, **{k: schema[k] for k in words}}, words | {"type"}, name, where, scope, depth
                        )
                    )
                    break
                except SchemaLimit:
                    raise
                except SchemaError:
                    continue
        if plain:
            return {}  # any JSON value, the converter's reading of an empty schema
        return {"anyOf": parts}

    def _rewrite(self, schema: dict, keys: set, where: str) -> dict | None:
        """The same schema in words clean() reads directly, narrowed where needed (the module's docstring); None
        when it is read as it is."""
        rest = {k: schema[k] for k in keys}
        if "$ref" in keys and keys != {"$ref"}:
            return {"allOf": [{"$ref": rest.pop("$ref")}, rest]}
        if keys & set(CONDITIONAL):
            cond = rest.pop("if", True)
            then, other = rest.pop("then", True), rest.pop("else", True)
            return {"allOf": [rest, other] if cond is False else [rest, cond, then]}
        if "not" in keys:
            return self._not(rest, where)
        for word in ("anyOf", "oneOf"):
            if word in keys and keys != {word} and isinstance(rest[word], list):
                alts = rest.pop(word)
                return {word: [a if a is False else {"allOf": [rest, a]} for a in alts]}
        return None

    @staticmethod
    def _not(rest: dict, where: str) -> dict:
        """not of types only: the other types (number and integer leave together, as a grammar cannot write a
        number that is no integer)."""
        sub = rest.pop("not")
        if sub is False:
            return rest
        if not isinstance(sub, dict) or set(sub) - ANNOTATIONS != {"type"}:
            raise SchemaError(f"{where}/not: only a not of types can be enforced (the grammar cannot enforce it)")
        banned = sub["type"] if isinstance(sub["type"], list) else [sub["type"]]
        if banned and {"integer", "number"} & set(banned):
            banned = [*banned, "integer", "number"]
        own = rest.get("type", sorted(TYPES))
        left = [t for t in (own if isinstance(own, list) else [own]) if t not in banned]
        if not left:
            raise SchemaError(f"{where}/not: no type is left, so no value is valid")
        return {**rest, "type": left}

    def _choice(self, schema: dict, where: str, scope, depth: int) -> dict:
        """anyOf, or oneOf whose alternatives no value can match twice."""
        word = "anyOf" if "anyOf" in schema else "oneOf"
        kinds.only(set(schema) - ANNOTATIONS, {word}, where, f"beside {word}")
        alts = schema[word]
        if not isinstance(alts, list) or not alts:
            raise SchemaError(f"{where}/{word}: must be a non-empty list of schemas")
        if len(alts) > MAX_ALTERNATIVES:
            raise limit(f"{where}/{word}", f"{len(alts):,} alternatives", MAX_ALTERNATIVES, "per anyOf")
        cleaned = [self.clean(s, f"{where}/{word}/{i}", scope, depth + 1) for i, s in enumerate(alts) if s is not False]
        if not cleaned:
            raise SchemaError(f"{where}/{word}: every alternative is false, so no value is valid")
        if word == "oneOf" and not disjoint(cleaned):
            raise SchemaError(
                f"{where}/oneOf: the alternatives may overlap (the grammar enforces oneOf only where "
                f"they are of distinct types or distinct values; use anyOf)"
            )
        return cleaned[0] if len(cleaned) == 1 else {"anyOf": cleaned}

    def lookup(self, ref, scope, where: str):
        if not isinstance(ref, str):
            raise SchemaError(f"{where}: must be a string")
        try:
            if scope is None:
                raise Unresolvable(ref)
            return scope.lookup(ref)
        except (Unresolvable, AttributeError, TypeError, ValueError):  # also a pointer through what is no schema
            raise SchemaError(
                f"{where}: {ref[:80]} cannot be resolved inside the schema (references reach its "
                f"own $defs, JSON pointers, $id and $anchor, nothing outside)"
            ) from None

    def _define(self, ref, scope, where: str, depth: int) -> str:
        resolved = self.lookup(ref, scope, f"{where}/$ref")
        key = id(resolved.contents)
        if key not in self._named:
            self._held.append(resolved.contents)
            name = self._named[key] = f"{DEF_PREFIX}{len(self._named)}"
            # named first: recursion finds the name. A chain of references nests as deep as it is long
            at = ref[1:] if ref.startswith("#/") else f"{where}/$ref"
            self.defs[name] = self.clean(resolved.contents, at, resolved.resolver, depth + 1)
        return self._named[key]

    def _merge(self, schema: dict, where: str, scope, depth: int) -> dict:
        return merge(self, schema, where, scope, depth)
