"""One JSON type's keywords, checked and cleaned: numbers, objects, arrays and strings (Checker.clean dispatches
here once a schema's type is known)."""

from __future__ import annotations

import json
import math

from .gbnf import INT_LIMIT
from .keywords import BOUNDS, BOUNDS_HOW, FORMATS
from .limits import MAX_ENUM_VALUES, MAX_OPTIONAL_PROPERTIES, MAX_REPEAT, SchemaError, limit, pointer
from .pattern import check_pattern

ANY_VALUE = {"type": ["string", "number", "boolean", "null", "object", "array"]}


def only(keys: set, allowed: set, where: str, context: str) -> None:
    extra = sorted(keys - allowed)
    if extra:
        raise SchemaError(f"{where}/{extra[0]}: not supported {context} (the grammar cannot enforce it)")


def _bound_value(schema: dict, word: str, kind: str, where: str):
    value = schema[word]
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or value != value
        or value in (float("inf"), float("-inf"))
    ):
        raise SchemaError(f"{where}/{word}: must be a number")
    if abs(value) >= INT_LIMIT:
        raise limit(f"{where}/{word}", f"{value:,}", INT_LIMIT, "")
    return value


def _bounds_of(schema: dict, kind: str, where: str):
    """(low, high): for an integer inclusive integers; for a number (whole bound, open) pairs, the tighter one on
    each side (at a tie the open one), a bound that is no whole number moved inward to one. None where unbounded."""
    low = high = None
    for word, strict, upper in BOUNDS_HOW:
        if word not in schema:
            continue
        value = _bound_value(schema, word, kind, where)
        if kind == "number":
            # the grammar bounds a number's integer part: a bound between two whole numbers narrows to the inner one
            inner = math.floor(value) if upper else math.ceil(value)
            bound = (int(value), strict) if float(value).is_integer() else (inner, False)
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
    return low, high


def number(checker, schema: dict, keys: set, kind: str, where: str) -> dict:
    """An integer's bounds as inclusive integers (minimum/maximum of the cleaned schema); a bounded integer
    multipleOf as the enum of its values. A number's bounds must be whole numbers (range_rule can then be exact
    about the decimals)."""
    only(keys, {"type", *BOUNDS, "multipleOf"}, where, f"for type {kind}")
    out = {"type": kind}
    low, high = _bounds_of(schema, kind, where)
    if kind == "number":
        if "multipleOf" in schema:
            raise SchemaError(f"{where}/multipleOf: supported only for integers with both bounds")
        if low and high and (low[0] > high[0] or low[0] == high[0] and (low[1] or high[1])):
            raise SchemaError(
                f"{where}: no number the grammar can write lies between the bounds (it bounds the "
                f"integer part: a range within one unit interval cannot be enforced)"
            )
        for bound, words in ((low, ("minimum", "exclusiveMinimum")), (high, ("maximum", "exclusiveMaximum"))):
            if bound:
                out[words[bound[1]]] = bound[0]
        return out
    if low is not None and high is not None and low > high:
        raise SchemaError(f"{where}: no {kind} lies between the bounds")
    if "multipleOf" in schema:
        return _multiples(checker, schema["multipleOf"], low, high, where)
    if low is not None:
        out["minimum"] = low
    if high is not None:
        out["maximum"] = high
    return out


def _multiples(checker, step, low: int | None, high: int | None, where: str) -> dict:
    """The integers from low to high that step divides, as an enum."""
    if low is None or high is None:
        raise SchemaError(f"{where}/multipleOf: supported only for integers with both bounds")
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not float(step).is_integer() or step <= 0:
        raise SchemaError(f"{where}/multipleOf: must be a positive whole number")
    step = int(step)
    first = -(-low // step) * step
    count = max(0, (high - first) // step + 1)
    if count > MAX_ENUM_VALUES:
        raise limit(f"{where}/multipleOf", f"{count:,} values between the bounds", MAX_ENUM_VALUES, "per enum")
    if not count:
        raise SchemaError(f"{where}/multipleOf: no multiple lies between the bounds")
    values = list(range(first, high + 1, step))
    checker.values(values, f"{where}/multipleOf")
    return {"enum": values}


def obj(checker, schema: dict, keys: set, where: str, scope, depth: int) -> dict:
    """properties (a property that is false may not appear: left out, which only a closed object can promise),
    required (a name not under properties takes additionalProperties' schema), additionalProperties. An object with
    properties admits no other keys unless additionalProperties says so."""
    only(keys, {"type", "properties", "required", "additionalProperties"}, where, "for objects")
    props, required = schema.get("properties", {}), schema.get("required", [])
    extra = schema.get("additionalProperties", "absent")
    if not isinstance(props, dict):
        raise SchemaError(f"{where}/properties: must be an object")
    if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
        raise SchemaError(f"{where}/required: must be a list of names")
    banned = [k for k, v in props.items() if v is False]
    if banned and extra not in ("absent", False):
        raise SchemaError(
            f"{where}/properties/{pointer(banned[0])}: false beside additionalProperties (the grammar "
            f"cannot keep one name out of the additional properties)"
        )
    for name in required:
        if name in banned or (name not in props and extra is False):
            raise SchemaError(f"{where}/required: {json.dumps(name)} may not appear, so no object is valid")
    props = {k: v for k, v in props.items() if v is not False}
    props.update({name: {} if extra in ("absent", True) else extra for name in required if name not in props})
    checker.count_properties(len(props), f"{where}/properties")
    optional = len(props) - len(set(required))
    if optional > MAX_OPTIONAL_PROPERTIES:
        raise limit(
            f"{where}/properties",
            f"{optional:,} properties are not required",
            MAX_OPTIONAL_PROPERTIES,
            "optional properties per object",
        )
    out = {
        "type": "object",
        "properties": {
            k: checker.clean(v, f"{where}/properties/{pointer(k)}", scope, depth + 1) for k, v in props.items()
        },
    }
    if required:
        out["required"] = list(dict.fromkeys(required))
    if isinstance(extra, bool):
        out["additionalProperties"] = extra
    elif extra != "absent":
        out["additionalProperties"] = checker.clean(extra, f"{where}/additionalProperties", scope, depth + 1)
    if not props and "additionalProperties" not in out:
        return {"type": "object"}
    return out


def array(checker, schema: dict, keys: set, where: str, scope, depth: int) -> dict:
    """items with minItems/maxItems; or a tuple (prefixItems, or draft 7's items list), written as exactly its
    items (as many as maxItems lets), so items and additionalItems past it never come into play."""
    only(keys, {"type", "items", "prefixItems", "minItems", "maxItems", "additionalItems"}, where, "for arrays")
    counts = bounds(schema, {}, "minItems", "maxItems", where)
    tuple_ = schema.get("prefixItems", schema.get("items") if isinstance(schema.get("items"), list) else None)
    if tuple_ is not None:
        word = "prefixItems" if "prefixItems" in schema else "items"
        if not isinstance(tuple_, list):
            raise SchemaError(f"{where}/{word}: must be a list of schemas")
        if len(tuple_) > MAX_REPEAT:
            raise limit(f"{where}/{word}", f"{len(tuple_):,} items", MAX_REPEAT, "items")
        tuple_ = tuple_[: counts.get("maxItems", len(tuple_))]
        if counts.get("minItems", 0) > len(tuple_) or any(s is False for s in tuple_):
            raise SchemaError(
                f"{where}/{word}: the grammar writes exactly these items, and they cannot satisfy "
                f"minItems or a false item"
            )
        return {
            "type": "array",
            "prefixItems": [checker.clean(s, f"{where}/{word}/{i}", scope, depth + 1) for i, s in enumerate(tuple_)],
        }
    if schema.get("items") is False:
        if counts.get("minItems", 0):
            raise SchemaError(f"{where}/items: false beside minItems, so no array is valid")
        return {"type": "array", "prefixItems": []}
    items = checker.clean(schema.get("items", True), f"{where}/items", scope, depth + 1)
    # the converter reads an empty items schema as none at all: any value is spelled out
    return {"type": "array", "items": items or ANY_VALUE, **counts}


def string(schema: dict, keys: set, where: str) -> dict:
    only(keys, {"type", "pattern", "format", "minLength", "maxLength"}, where, "for strings")
    if ("pattern" in keys) + ("format" in keys) + bool(keys & {"minLength", "maxLength"}) > 1:
        word = sorted(keys & {"minLength", "maxLength", "format"})[-1]
        raise SchemaError(
            f"{where}/{word}: pattern, format and minLength/maxLength cannot be combined (write the "
            f"length into the pattern, e.g. ^[a-z]{{1,8}}$)"
        )
    out = {"type": "string"}
    if "pattern" in schema:
        out["pattern"] = check_pattern(schema["pattern"], f"{where}/pattern")
    if "format" in schema:
        if schema["format"] not in FORMATS:
            raise SchemaError(
                f"{where}/format: {json.dumps(schema['format'])[:40]} is not supported (only "
                f"{', '.join(sorted(FORMATS))})"
            )
        out["format"] = schema["format"]
    return bounds(schema, out, "minLength", "maxLength", where)


def bounds(schema: dict, out: dict, low: str, high: str, where: str) -> dict:
    """out with schema's low/high counts (minItems/maxItems, minLength/maxLength), checked."""
    for word in (low, high):
        if word in schema:
            value = schema[word]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SchemaError(f"{where}/{word}: must be a non-negative integer")
            if value > MAX_REPEAT:
                raise limit(f"{where}/{word}", f"{value:,}", MAX_REPEAT, "")
            out[word] = value
    if out.get(low, 0) > out.get(high, out.get(low, 0)):
        raise SchemaError(f"{where}: {low} is above {high}")
    return out
