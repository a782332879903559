"""What one request's schemas may ask of the grammar, and the errors a schema gets."""

from __future__ import annotations

# What one request's schemas (response_format's, or all its tools' parameters together) may ask of the grammar.
# Why each (the measurements behind them, on the quickstart model: BENCHMARKS.md; tests/test_hardening_schema.py
# keeps them honest):
# - the grammar engine (llguidance, serve/backends/guides.py) follows nested groups and rules recursively, so
#   nesting deep enough overflows its stack and ends the whole server (SIGSEGV). Counts are written as x{m,n}, which
#   nests nothing; nesting comes from schemas inside schemas and pattern groups (MAX_DEPTH), and
#   serve/backends/gbnf_lark.py refuses groups nested past its own MOST_NESTED before the engine reads them.
# - a repeated group whose body varies in length keeps a parse state per way to split the text (hence
#   MAX_GROUP_REPEAT and MAX_REPEAT_PRODUCT); an enum is one alternative per value, alive while they share a prefix
#   (hence the enum limits); the optional properties of one object are alternatives too, and the converter builds
#   them in quadratic time (hence MAX_OPTIONAL_PROPERTIES). Each costs the token masks of every step.
# - the limits sit above what real applications send: OpenAI's structured outputs take at most 5 000 properties,
#   10 levels of nesting, 1 000 enum values and 120 000 characters of names and values; agents send up to 128 tools.
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
MAX_GRAMMAR_BYTES = 4 * 1024 * 1024  # the grammar text the engine reads (a backstop: the limits above keep it lower)
MAX_GRAMMAR_RULES = 20_000


class SchemaError(ValueError):
    """A schema the grammar cannot enforce; the message says what and where (a JSON pointer inside the schema;
    `param`, where set, is the schema's place in the request)."""

    param: str | None = None


class StrictError(SchemaError):
    """A schema sent with strict: true that breaks OpenAI's strict rules (check_strict)."""


class SchemaLimit(SchemaError):
    """A schema beyond one of the limits above; the message names the keyword (its JSON pointer) and the limit."""


def limit(where: str, what: str, limit: int, unit: str) -> SchemaLimit:
    return SchemaLimit(f"{where or '/'}: {what}, above the limit of {limit:,}{' ' + unit if unit else ''}")


def pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")
