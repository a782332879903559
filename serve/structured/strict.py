"""OpenAI's strict mode rules, checked before anything else."""

from __future__ import annotations

from .limits import StrictError, pointer

# where schemas sit inside a schema, for check_strict's walk: keyword -> holds one schema, a list, or a name map
SUBSCHEMAS = {
    "items": "one",
    "additionalProperties": "one",
    "not": "one",
    "prefixItems": "list",
    "anyOf": "list",
    "oneOf": "list",
    "allOf": "list",
    "properties": "map",
    "$defs": "map",
    "definitions": "map",
}


def check_strict(schema, where: str = "") -> None:
    """OpenAI's strict mode: every object lists all its properties in required and sets additionalProperties
    false. StrictError names the first object (its JSON pointer) that does not, the way OpenAI words it."""
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        if schema.get("additionalProperties") is not False:
            raise StrictError(
                f"In context={where or '/'}, 'additionalProperties' is required to be supplied and to be false"
            )
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        missing = [k for k in props if k not in required]
        if missing:
            raise StrictError(
                f"In context={where or '/'}, 'required' is required to be supplied and to be an array "
                f"including every key in properties. Missing '{missing[0]}'"
            )
    for key, shape in SUBSCHEMAS.items():
        value = schema.get(key)
        if shape == "one":
            check_strict(value, f"{where}/{key}")
        elif shape == "list" and isinstance(value, list):
            for i, sub in enumerate(value):
                check_strict(sub, f"{where}/{key}/{i}")
        elif shape == "map" and isinstance(value, dict):
            for name, sub in value.items():
                check_strict(sub, f"{where}/{key}/{pointer(name)}")
