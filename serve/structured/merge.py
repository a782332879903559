"""allOf as one schema: the subschemas merged where they can be (Checker.clean reads the result)."""

from __future__ import annotations

import json

from .keywords import ANNOTATIONS
from .limits import MAX_DEPTH, SchemaError, limit


def _inline(checker, sub, at: str, scope):
    """A subschema that is only a $ref, as its target (copied in, so counted again); a target in another document
    ($id) may not hold references of its own, which would then be read against the wrong base."""
    if not (isinstance(sub, dict) and "$ref" in sub and not set(sub) - ANNOTATIONS - {"$ref"}):
        return sub
    resolved = checker.lookup(sub["$ref"], scope, f"{at}/$ref")
    target = resolved.contents
    if resolved.resolver.lookup("").contents is not scope.lookup("").contents and '"$ref"' in json.dumps(target):
        raise SchemaError(
            f"{at}/$ref: a target under another $id with references of its own cannot be merged into the allOf"
        )
    checker.count(target, f"{at}/$ref")
    return target


def _join(merged: dict, sub: dict, where: str) -> None:
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
            raise SchemaError(
                f"{where}/allOf: {key} differs between its subschemas (the grammar enforces allOf only "
                f"where they merge)"
            )


def merge(checker, schema: dict, where: str, scope, depth: int) -> dict:
    """One schema for an allOf and the keywords beside it: properties united (a property in several gets an allOf
    of its own), required united, any other keyword in one place only or the same everywhere; an
    additionalProperties other than true only where its schema lists every property of the merge."""
    if depth > MAX_DEPTH:
        raise limit(where, f"schemas nested {depth} deep", MAX_DEPTH, "levels")
    subs = schema["allOf"]
    if not isinstance(subs, list) or not subs:
        raise SchemaError(f"{where}/allOf: must be a non-empty list of schemas")
    merged = {k: v for k, v in schema.items() if k not in ("allOf", "$id", "$anchor")}
    closed = [(where, merged)] if merged.get("additionalProperties", True) is not True else []
    for i, sub in enumerate(subs):
        at = f"{where}/allOf/{i}"
        sub = _inline(checker, sub, at, scope)
        if sub is True:
            continue
        if sub is False:
            raise SchemaError(f"{at}: false, so no value is valid")
        if isinstance(sub, dict) and "allOf" in sub:
            sub = merge(checker, sub, at, scope, depth + 1)
        if not isinstance(sub, dict):
            raise SchemaError(f"{at}: a schema must be an object (or true), not {json.dumps(sub)[:40]}")
        if sub.get("additionalProperties", True) is not True:
            closed.append((at, sub))
        _join(merged, {k: v for k, v in sub.items() if k not in ("$id", "$anchor")}, where)
    for at, sub in closed:
        if set(merged.get("properties", {})) - set(sub.get("properties", {})):
            raise SchemaError(
                f"{where}/allOf: additionalProperties at {at or '/'} would refuse properties that "
                f"another subschema adds (the grammar enforces allOf only where they merge)"
            )
    return merged
