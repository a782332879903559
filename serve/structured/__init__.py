"""Structured output: JSON Schemas turned into llama.cpp grammars (GBNF) that constrain decoding, so a reply always
parses and validates.

llama-cpp-python's converter writes the grammar (gbnf.py). It enforces only part of JSON Schema, so every schema is
checked and rewritten first (checker.py): the grammar may admit part of what a schema validates, never more, so a
schema is served exactly, or narrowed, or refused (400) with the keyword and its JSON pointer. Served:

- type (one name or a list, each type with its own keywords); const and enum (beside other keywords, the values
  that validate against them); a schema without a type as every type, each held to its own keywords (a type whose
  keywords cannot be enforced is left out: narrowed)
- integers: minimum, maximum, exclusiveMinimum, exclusiveMaximum exactly (range rules of our own), multipleOf when
  both bounds are given (the values enumerated); numbers: the same bounds when they are whole numbers
- objects: properties (false ones kept out), required (a name not under properties takes additionalProperties'
  schema), additionalProperties (true, false or a schema); an object with properties admits no other keys unless
  additionalProperties says so (narrowed)
- arrays: items (false: empty) with minItems/maxItems; prefixItems or draft 7's items list as exactly those items
  (narrowed: none past them)
- strings: one of minLength/maxLength, pattern (pattern.py) or format (uuid by its shape; date, time, date-time,
  email, ipv4, ipv6, uri by rules of our own: real calendar dates, addresses Python's ipaddress reads)
- anyOf; oneOf where no value can match two alternatives (distinct types, distinct values, or objects told apart by
  a required tag); allOf where the subschemas merge (merge.py); keywords beside anyOf, oneOf or $ref join each
  alternative; if/then/else as if and then (else where if is false); not of types as the other types (narrowed)
- $ref inside the schema: JSON pointers, $defs, $id and $anchor (recursion included), resolved with `referencing`,
  never fetched; boolean schemas (false refused as unsatisfiable)

Every schema is also held to the limits (limits.py; SchemaLimit names the keyword and the limit), so no schema can
crash llama.cpp or slow the decoding that every client shares.
"""

from __future__ import annotations

from .checker import Checker
from .gbnf import grammar, range_rule
from .keywords import BOUNDS, FORMATS
from .limits import (
    MAX_ALTERNATIVES,
    MAX_DEPTH,
    MAX_ENUM_BYTES,
    MAX_ENUM_VALUES,
    MAX_GRAMMAR_BYTES,
    MAX_GRAMMAR_RULES,
    MAX_GROUP_REPEAT,
    MAX_OPTIONAL_PROPERTIES,
    MAX_PROPERTIES,
    MAX_REPEAT,
    MAX_REPEAT_PRODUCT,
    MAX_SCHEMA_BYTES,
    SchemaError,
    SchemaLimit,
    StrictError,
)
from .pattern import check_pattern
from .strict import check_strict

__all__ = [
    "BOUNDS",
    "FORMATS",
    "MAX_ALTERNATIVES",
    "MAX_DEPTH",
    "MAX_ENUM_BYTES",
    "MAX_ENUM_VALUES",
    "MAX_GRAMMAR_BYTES",
    "MAX_GRAMMAR_RULES",
    "MAX_GROUP_REPEAT",
    "MAX_OPTIONAL_PROPERTIES",
    "MAX_PROPERTIES",
    "MAX_REPEAT",
    "MAX_REPEAT_PRODUCT",
    "MAX_SCHEMA_BYTES",
    "Checker",
    "SchemaError",
    "SchemaLimit",
    "StrictError",
    "check_pattern",
    "check_strict",
    "grammar",
    "range_rule",
    "schema_grammar",
]


def schema_grammar(schema) -> str:
    """GBNF for one user schema (checked here; SchemaError if it cannot be enforced)."""
    checker = Checker()
    cleaned = checker.admit(schema)
    return grammar(cleaned, checker.defs)
