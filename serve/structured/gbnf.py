"""GBNF from cleaned schemas: llama-cpp-python's converter, with numeric ranges, calendar and internet formats written
by rules of our own, and string characters that always make JSON."""

from __future__ import annotations

import re

from aegis import llamacpp

from .keywords import BOUNDS
from .limits import MAX_GRAMMAR_BYTES, MAX_GRAMMAR_RULES, limit

# JSON strings may not hold raw control characters, a quote or a backslash; the converter's own rules let some
# through, so the grammar gets these in their place.
CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
DOT_RULE = r'dot ::= [^"\\\x7F\x00-\x1F]'

# ---- numeric ranges -----------------------------------------------------------------------------------------
# The converter writes integers as at most 16 digits and knows no bounds: bounded integers and numbers get rules of
# our own. INT_LIMIT stands for "unbounded" on either side, so every range is finite.
INT_LIMIT = 10**16 - 1
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
        a, b = max(low, 10 ** (length - 1) if length > 1 else 0), min(high, 10**length - 1)
        if a <= b:
            out += _same_length(str(a), str(b))
    return out


def range_rule(
    low: int | None, high: int | None, low_open: bool = False, high_open: bool = False, fractions: bool = False
) -> str:
    """GBNF for the integers from low to high (None: unbounded on that side; *_open: the bound itself excluded);
    with fractions, also the decimals I.F (or -I.F) between them: any F where the whole unit interval of I lies
    within, a nonzero F where only its open part does (I = an open bound), so no value written falls outside."""
    low = -INT_LIMIT if low is None else low
    high = INT_LIMIT if high is None else high
    first, last = low + low_open, high - high_open  # the integers
    alts = []

    def add(sign: str, a: int, b: int, tail: str = "") -> None:
        if a <= b:
            alts.append(f"{sign}({' | '.join(_naturals(a, b))}){tail}")

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


def _counted(item: str, low: int, high: int | None) -> str:
    if high == 0:
        return ""
    if high is None:
        return f"{item}*" if low == 0 else f"{item}+" if low == 1 else f"{item}{{{low},}}"
    if (low, high) == (0, 1):
        return f"{item}?"
    if low == high:
        return item if low == 1 else f"{item}{{{low}}}"
    return f"{item}{{{low},{high}}}"


def repetition(item_rule: str, min_items: int, max_items: int | None, separator_rule=None, item_rule_is_literal=False):
    """GBNF for min_items to max_items (None: no end) of item_rule, separated by separator_rule if given, written
    with GBNF's counted repetition, so its nesting does not grow with the count."""
    del item_rule_is_literal  # a literal repeats as well as any item
    if max_items == 0:
        return ""
    item = f"({item_rule})"
    if not separator_rule:
        return _counted(item, min_items, max_items)
    rest = _counted(
        f"({separator_rule} {item_rule})", max(min_items - 1, 0), None if max_items is None else max_items - 1
    )
    both = f"{item} {rest}".rstrip()
    return both if min_items > 0 else f"({both})?"


class _Converter:
    """llama-cpp-python's converter with the calendar formats written by our own rules (made lazily: the class
    lives in llama_cpp, which loads only through aegis.llamacpp.runtime())."""

    cls = None

    @classmethod
    def make(cls):
        if cls.cls is None:
            llamacpp.runtime()  # llama.cpp loads the one safe way before its package is imported
            from llama_cpp import llama_grammar
            from llama_cpp.llama_grammar import SchemaConverter

            # The converter's own repetition writes x{0,n} as n nested optional groups: as deep as the count, which
            # the grammar engine's reader walks recursively. GBNF has {m,n}: the converter's methods call this
            # module-level function, so it is replaced where they look it up.
            llama_grammar._build_repetition = repetition

            class Converter(SchemaConverter):
                def visit(self, schema, name):
                    fmt = schema.get("format")
                    if schema.get("type") == "string" and fmt in OWN_FORMATS:
                        rule = self._format(fmt)
                        return self._add_rule(
                            name + "-" if name in ("root", "dot") else name or "root", f'"\\"" {rule} "\\"" space'
                        )
                    if schema.get("type") in ("integer", "number") and set(schema) & BOUNDS:
                        rule = range_rule(
                            schema.get("minimum", schema.get("exclusiveMinimum")),
                            schema.get("maximum", schema.get("exclusiveMaximum")),
                            "exclusiveMinimum" in schema,
                            "exclusiveMaximum" in schema,
                            schema["type"] == "number",
                        )
                        return self._add_rule(
                            name + "-" if name in ("root", "dot") else name or "root", f"({rule}) space"
                        )
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
    (
        "month-day",
        '("01" | "03" | "05" | "07" | "08" | "10" | "12") "-" ({day-28} | "29" | "30" | "31") | '
        '("04" | "06" | "09" | "11") "-" ({day-28} | "29" | "30") | "02-" {day-28}',
    ),
    ("date", '{year} "-" {month-day} | {leap-year} "-02-29"'),
    ("hour", '[01] [0-9] | "2" [0-3]'),
    (
        "time",
        '{hour} ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9] ([0-9] ([0-9] ([0-9] ([0-9] [0-9]?)?)?)?)?)? '
        '("Z" | ("+" | "-") {hour} ":" [0-5] [0-9])',
    ),
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
    ("label", "[a-z0-9] ([a-z0-9-]{{0,20}} [a-z0-9])?"),
    ("domain", '{label} ("." {label}){{0,3}} "." [a-z]{{2,10}}'),
    ("email", '[a-zA-Z0-9_%+-]{{1,24}} ("." [a-zA-Z0-9_%+-]{{1,24}}){{0,2}} "@" {domain}'),
    ("uri-char", '[a-zA-Z0-9._~!$&\'()*+,;=:@-] | "%" [0-9A-F] [0-9A-F]'),
    (
        "uri",
        '[a-z] [a-z0-9+.-]{{0,15}} "://" {domain} (":" [1-9] [0-9]{{0,3}})? ("/" {uri-char}{{0,24}}){{0,6}} '
        '("?" ({uri-char} | "/" | "?"){{0,32}})?',
    ),
]
OWN_FORMATS = frozenset({"date", "time", "date-time", "ipv4", "ipv6", "email", "uri"})


def grammar(schema: dict, defs: dict[str, dict], extra_rules: str = "") -> str:
    """GBNF for a checked schema (Checker.clean) with its definitions; the schema's rule is `root` unless
    extra_rules defines root itself (then the schema's rule is `json-reply`)."""
    name = "json-reply" if extra_rules else ""
    converter = _Converter.make()
    # the definitions are known by name: the converter's own resolve_refs would also walk into enum and const
    # values, reading a value such as {"$ref": "#/x"} as a reference
    converter._refs = {f"#/$defs/{key}": value for key, value in defs.items()}
    converter.visit(schema, name)
    text = converter.format_grammar()
    text = re.sub(r"^char ::= .*$", lambda _: CHAR_RULE, text, flags=re.M)
    text = re.sub(r"^dot ::= .*$", lambda _: DOT_RULE, text, flags=re.M)
    text += "\n" + extra_rules if extra_rules else ""
    rules = text.count("\n") + 1
    if len(text) > MAX_GRAMMAR_BYTES or rules > MAX_GRAMMAR_RULES:
        raise limit(
            "",
            f"its grammar would take {len(text):,} bytes in {rules:,} rules",
            MAX_GRAMMAR_BYTES,
            f"bytes (and {MAX_GRAMMAR_RULES:,} rules)",
        )
    return text
