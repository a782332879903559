"""bench/schema_coverage.py sorts each engine's replies into the right category (valid, refused, invalid, cut,
error), so the coverage it reports cannot silently count a broken reply as supported. Outcomes are written here the
way the harness records them from the server and from its child processes; no server or model is needed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("schema_coverage", ROOT / "bench" / "schema_coverage.py")
cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cov)

OBJECT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}, "required": ["n"]}


def ok(text: str, finish: str = "stop") -> dict:
    return {"status": 200, "text": text, "finish": finish}


def test_every_reply_validating_is_valid():
    assert cov.classify("draft2020-12", OBJECT, [ok('{"n": 3}'), ok('{"n": 40}')]) == {"category": "valid"}


def test_one_reply_that_breaks_the_schema_makes_it_invalid():
    """The second seed's reply violates minimum: the schema is invalid even though the first reply validated;
    text that is not JSON is invalid too."""
    got = cov.classify("draft2020-12", OBJECT, [ok('{"n": 3}'), ok('{"n": 2}')])
    assert got["category"] == "invalid" and "minimum" in got["detail"]
    assert cov.classify("draft7", OBJECT, [ok('{"n": 3')])["category"] == "invalid"


def test_the_draft_decides_validity():
    """`dependencies` is a draft7 keyword that 2020-12 replaced (dependentRequired): one reply, two verdicts."""
    schema = {"dependencies": {"a": ["b"]}}
    assert cov.classify("draft7", schema, [ok('{"a": 1}')])["category"] == "invalid"
    assert cov.classify("draft2020-12", schema, [ok('{"a": 1}')])["category"] == "valid"


def test_a_4xx_is_a_refusal_naming_its_keyword():
    server = {
        "status": 400,
        "error": "this schema cannot be enforced: /properties/a/oneOf: not supported (the grammar cannot enforce it)",
    }
    got = cov.classify("draft2020-12", OBJECT, [server])
    assert got["category"] == "refused" and got["refused_keyword"] == "oneOf"
    compiler = {"status": 400, "error": 'ValueError: Unimplemented keys: ["propertyNames"]'}
    assert cov.classify("draft7", OBJECT, [compiler])["refused_keyword"] == "propertyNames"


def test_cut_offs_are_neither_valid_nor_hide_an_invalid_reply():
    assert cov.classify("draft2020-12", OBJECT, [ok('{"n": 3}'), ok('{"n": 1', "length")])["category"] == "cut"
    mixed = [ok('{"n": 1}'), ok('{"n": 1', "length")]
    assert cov.classify("draft2020-12", OBJECT, mixed)["category"] == "invalid"


@pytest.mark.parametrize(
    "outcome", [{"status": None, "error": "child died (signal 11)"}, {"status": 500, "error": "internal"}]
)
def test_a_crash_or_5xx_is_an_error_whatever_else_came(outcome):
    assert cov.classify("draft2020-12", OBJECT, [ok('{"n": 3}'), outcome])["category"] == "error"


def test_only_schemas_that_need_another_document_are_skipped():
    local = {
        "draft": "draft2020-12",
        "schema": {"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a"},
        "instances": [1, "x"],
    }
    remote = {
        "draft": "draft2020-12",
        "schema": {"$ref": "http://localhost:1234/draft2020-12/integer.json"},
        "instances": [1],
    }
    assert not cov.needs_remote(local) and cov.needs_remote(remote)


def test_the_table_counts_each_category_per_keyword():
    results = {
        "aegis": {
            "d/const/0": {"draft": "draft7", "keyword": "const", "category": "valid"},
            "d/const/1": {"draft": "draft7", "keyword": "const", "category": "refused"},
        }
    }
    table = cov.markdown(results)
    assert "| const | 1/1/0/0/0 |" in table and "| (draft7) total | 1/1/0/0/0 |" in table
