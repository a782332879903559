"""Structured-output schemas never crash or stall the server: every grammar the server builds (response_format
json_schema/json_object, tool parameters under every tool_choice) is held to serve/structured's limits before the
grammar engine sees it, refused with a 400 that names the param, the keyword's JSON pointer and the limit, and built
off the event loop. Checked against the real server process (`python -m serve` on the test run's GGUF): known-bad
schemas (those that once killed or stalled it), generated ones (hypothesis), a small request's latency while big
ones are built or refused, and the calendar formats, both through the engine's own matcher
(serve/backends/guides.py) and sampled."""

from __future__ import annotations

import calendar
import concurrent.futures
import ctypes
import datetime
import json
import random
import resource
import statistics
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from aegis import llamacpp
from serve import structured
from serve.backends import gbnf_lark
from serve.backends.guides import Guides
from support import serving
from support.schemas import formatted

USER = [{"role": "user", "content": "予定を JSON で"}]
SCHEMA_PARAM = "response_format.json_schema.schema"
TOOL_PARAM = "tools[0].function.parameters"


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    with serving.tiny_server(request, tmp_path_factory, "--timeout", "60") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.api, timeout=120) as c:
        yield c


def as_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}


def as_tool(schema) -> list[dict]:
    return [{"type": "function", "function": {"name": "act", "parameters": schema}}]


def chat(http, max_tokens=2, **fields) -> httpx.Response:
    return http.post(
        "/chat/completions",
        json={"model": "tiny", "messages": USER, "max_tokens": max_tokens, "temperature": 0, **fields},
    )


def nested(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def props(n: int, required: bool) -> dict:
    names = [f"p{i}" for i in range(n)]
    return {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in names},
        **({"required": names} if required else {}),
    }


def pattern(p: str) -> dict:
    return {"type": "object", "properties": {"s": {"type": "string", "pattern": p}}, "required": ["s"]}


# (schema, JSON pointer named in the message, the limit named in it): each crashed or stalled the server once, or
# sits just past a limit
KNOWN_BAD = {
    "repetition_20000": (pattern("^a{0,20000}$"), "/properties/s/pattern", "1,000"),
    "repetition_15000": (pattern("^a{0,15000}$"), "/properties/s/pattern", "1,000"),
    "nested_repetition": (pattern("^(a{0,100}){0,100}$"), "/properties/s/pattern", "16"),
    "nullable_group_repeated": (pattern("^(a?){0,100}$"), "/properties/s/pattern", "16"),
    "empty_alternative_repeated": (pattern("^(|a){0,100}$"), "/properties/s/pattern", "16"),
    "repetition_product": (pattern("^([a-z]{0,20}[.]){1,16}$"), "/properties/s/pattern", "256"),
    "group_depth": (pattern("^" + "(" * 40 + "a" + ")" * 40 + "$"), "/properties/s/pattern", "32"),
    "group_depth_huge": (pattern("^" + "(" * 20000 + "a" + ")" * 20000 + "$"), "/properties/s/pattern", "32"),
    "enum_20000": ({"enum": [f"value-{i}" for i in range(20000)]}, "/enum", "1,000"),
    "enum_bytes": ({"type": "object", "properties": {"f": {"const": "y" * 150_000}}}, "/properties/f/const", "131,072"),
    "max_length_20000": ({"type": "string", "maxLength": 20000}, "/maxLength", "1,000"),
    "min_items_20000": ({"type": "array", "items": {"type": "integer"}, "minItems": 20000}, "/minItems", "1,000"),
    "deep_nesting": (nested(200), "/properties/a" * 31, "32"),
    "ref_chain": (
        {
            "$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(100)} | {"d100": {"type": "null"}},
            "$ref": "#/$defs/d0",
        },
        "/$defs/d",
        "32",
    ),
    "optional_properties": (props(101, required=False), "/properties", "100"),
    "properties_total": (
        {"type": "object", "properties": {f"g{j}": props(100, True) for j in range(51)}},
        "/properties",
        "5,000",
    ),
    "any_of": ({"anyOf": [{"const": i} for i in range(129)]}, "/anyOf", "128"),
    "schema_bytes": ({"type": "object", "description": "x" * 600_000}, "/", "524,288"),
    # allOf copies what its $ref points at into the merge: the copies count against the request's bytes
    "all_of_copies": (
        {
            "type": "object",
            "$defs": {"big": {"type": "object", "description": "x" * 100_000}},
            "properties": {f"c{i}": {"allOf": [{"$ref": "#/$defs/big"}]} for i in range(6)},
        },
        "/properties/c4/allOf/0/$ref",
        "524,288",
    ),
    "multiple_of_values": (
        {"type": "integer", "minimum": 0, "maximum": 10_000, "multipleOf": 7},
        "/multipleOf",
        "1,000",
    ),
    "integer_bound": ({"type": "integer", "maximum": 10**17}, "/maximum", "9,999,999,999,999,999"),
}


def assert_refused(r: httpx.Response, param: str, pointer: str, limit: str) -> None:
    assert r.status_code == 400, r.text[:500]
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["code"] == "schema_too_large", err
    assert f"{param}#{pointer}" in err["message"], err["message"]
    assert f"limit of {limit}" in err["message"], err["message"]


@pytest.mark.parametrize("name", KNOWN_BAD)
def test_known_bad_schemas_are_refused_by_name(server, http, name):
    schema, pointer, limit = KNOWN_BAD[name]
    assert_refused(chat(http, response_format=as_format(schema)), SCHEMA_PARAM, pointer, limit)
    if schema.get("type") == "object":  # a function's parameters are an object schema
        wrapped, inner = schema, pointer
    else:  # references resolve against the parameters as a whole, where the definitions go
        wrapped = {"type": "object", "properties": {"x": schema}, "$defs": schema.get("$defs", {})}
        inner = pointer if pointer.startswith("/$defs") else "/properties/x" + pointer
    for choice in ("auto", "required", {"type": "function", "function": {"name": "act"}}):
        assert_refused(chat(http, tools=as_tool(wrapped), tool_choice=choice), TOOL_PARAM, inner, limit)
    assert server.alive(), server.log()


def test_too_many_tools_is_refused_by_name(http):
    tools = [{"type": "function", "function": {"name": f"t{i}", "parameters": {"type": "object"}}} for i in range(129)]
    r = chat(http, tools=tools)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    assert "128" in r.json()["error"]["message"]  # the request type caps it; tools.grammar again


def big_tools(n_tools=128, n_params=30) -> list[dict]:
    """What an agent with many tools sends: each with optional parameters (the limits' own example, admitted)."""
    return [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "does a thing",
                "parameters": {
                    "type": "object",
                    "properties": {
                        f"param_{i}_{j}": {"type": ["string", "integer", "boolean"][j % 3], "description": "x" * 50}
                        for j in range(n_params)
                    },
                },
            },
        }
        for i in range(n_tools)
    ]


def big_format() -> dict:
    """The same as one response_format: the grammar tools.grammar builds for big_tools, near MAX_SCHEMA_BYTES."""
    return as_format(
        {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
                    "required": ["name", "arguments"],
                }
                for t in big_tools()
            ]
        }
    )


def test_schemas_at_the_limits_are_admitted(http):
    """The limits admit what real applications send: the largest shapes just inside every limit are served."""
    ok = [
        pattern("^a{0,1000}$"),
        pattern("^([a-z0-9]{1,63}[.]){1,4}[a-z]{2,6}$"),
        pattern("^(a{0,15}){0,16}$"),
        {"enum": [f"v{i}" for i in range(1000)]},
        nested(31),
        props(100, required=False),
        {"type": "object", "properties": {f"g{j}": props(100, True) for j in range(49)}},
        {"anyOf": [{"const": i} for i in range(128)]},
        {"type": "string", "maxLength": 1000},
    ]
    for schema in ok:
        r = chat(http, response_format=as_format(schema))
        assert r.status_code == 200, (r.text[:300], json.dumps(schema)[:200])
    assert chat(http, response_format=big_format()).status_code == 200
    # the tools' grammar is built and admitted; their descriptions then overflow the tiny model's context
    r = chat(http, tools=big_tools(), tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]


# the server's grammar engine in a child process, compiling on a thread with a 1 MB stack (an eighth of a thread's
# default): a crash there is a negative return code, not the end of the test run
COMPILE_CHILD = """
import json, sys, threading
from aegis import llamacpp
from serve.backends.guides import Guides, GrammarError
lib = llamacpp.runtime()
params = lib.llama_model_default_params()
params.vocab_only = True
vocab = lib.llama_model_get_vocab(lib.llama_model_load_from_file(sys.argv[1].encode(), params))
n = lib.llama_vocab_n_tokens(vocab)
guides = Guides(vocab, n, [t for t in range(n) if lib.llama_vocab_is_eog(vocab, t)])
grammars = json.loads(sys.stdin.read())
def compile_all():
    for g in grammars:
        try:
            guides.compile(g)
            print("compiled")
        except GrammarError as e:
            print("refused:", str(e).splitlines()[0])
threading.stack_size(1 << 20)
t = threading.Thread(target=compile_all)
t.start()
t.join()
"""


def test_the_deepest_grammars_leave_the_engine_a_margin(request):
    """llguidance follows groups and rules recursively, so nesting deep enough overflows its stack (SIGSEGV, the
    whole server). The deepest schemas the limits admit (objects MAX_DEPTH - 1 deep, a pattern's groups as deep as
    allowed, the tool grammars) and groups nested exactly gbnf_lark.MOST_NESTED deep compile on a 1 MB stack; groups
    nested past it, which no admitted schema writes, are refused by name before llguidance reads them."""
    gguf, _ = serving.served_files(request)
    depth = structured.MAX_DEPTH - 1
    grammars = [
        structured.schema_grammar(nested(depth)),
        structured.schema_grammar(pattern("^" + "(a" * depth + ")?" * depth + "$")),
        structured.schema_grammar({"anyOf": [nested(depth), {"type": "array", "items": nested(depth - 1)}]}),
        "root ::= " + '("a" ' * gbnf_lark.MOST_NESTED + ")?" * gbnf_lark.MOST_NESTED,
        "root ::= " + '("a" ' * (gbnf_lark.MOST_NESTED + 1) + ")?" * (gbnf_lark.MOST_NESTED + 1),
    ]
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_CHILD, str(gguf)],
        input=json.dumps(grammars),
        cwd=serving.REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    said = done.stdout.splitlines()
    assert said[:4] == ["compiled"] * 4, said
    assert said[4].startswith("refused:") and "nested more than" in said[4], said


# ---- latency: building or refusing a big schema holds no one else up ------------------------------------------


def _timed(http) -> float:
    t = time.perf_counter()
    r = chat(http)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t


def test_a_small_request_keeps_its_latency_while_big_schemas_are_built(server, http):
    for _ in range(2):
        _timed(http)  # warm
    normal = statistics.median(_timed(http) for _ in range(5))
    big = {"response_format": big_format()}
    bad = {
        "response_format": as_format(
            {"type": "object", "properties": {f"e{j}": {"enum": [f"value-{i}" for i in range(999)]} for j in range(30)}}
        )
    }  # refused, after ~0.5 MB
    for body, status in ((big, 200), (bad, 400)):
        stop = threading.Event()

        def hammer(body=body, status=status, stop=stop):
            with httpx.Client(base_url=server.api, timeout=120) as c:
                while not stop.is_set():
                    assert chat(c, **body).status_code == status

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(hammer)
            time.sleep(0.3)  # the big one is being built
            times = [_timed(http) for _ in range(6)]
            stop.set()
            job.result()
        print(
            f"normal {normal:.3f} s; while {list(body)[0]} is {'built' if status == 200 else 'refused'}: "
            + " ".join(f"{t:.3f}" for t in times)
        )
        assert max(times) <= normal + 0.5, (normal, times, list(body))


# ---- fuzzing with generated schemas ------------------------------------------------------------------------------

TYPES = ["object", "array", "string", "number", "integer", "boolean", "null", "date", 7, None]
COUNTS = st.sampled_from([0, 1, 2, 3, 15, 16, 17, 100, 1000, 1001, 20000, -1])
PATTERN_ATOMS = st.sampled_from(["a", "[a-z]", "[0-9]", ".", "\\(", "(a|b)", "\\d", "[^a]", '"', "é", "(?:a)"])


@st.composite
def patterns(draw) -> str:
    def unit(depth):
        if depth < 3 and draw(st.booleans()):
            body = "".join(unit(depth + 1) for _ in range(draw(st.integers(1, 3))))
            atom = f"({body})"
        else:
            atom = draw(PATTERN_ATOMS)
        quantifier = draw(st.sampled_from(["", "", "?", "*", "+", "{%d}", "{%d,}", "{0,%d}", "{1,%d}", "{%d,2}"]))
        return atom + (quantifier % draw(COUNTS) if "%" in quantifier else quantifier)

    text = "".join(unit(0) for _ in range(draw(st.integers(1, 4))))
    return draw(st.sampled_from(["^{}$", "^{}$", "{}", "^{}"])).format(text)


def _enum(n: int) -> dict:
    return {"enum": [f"v{i}" for i in range(n)]}


LEAVES = st.one_of(
    st.sampled_from(TYPES).map(lambda t: {"type": t}),
    st.builds(lambda p: {"type": "string", "pattern": p}, patterns()),
    st.sampled_from(["date", "time", "date-time", "uuid", "email", 3]).map(lambda f: {"type": "string", "format": f}),
    st.builds(lambda k, n: {"type": "string", k: n}, st.sampled_from(["minLength", "maxLength"]), COUNTS),
    st.lists(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)), max_size=5).map(
        lambda v: {"enum": v}
    ),
    COUNTS.map(_enum),
    st.just({"const": {"a": [1, None]}}),
    st.sampled_from([{"$ref": "#"}, {"$ref": "#/properties/x"}, {"$ref": "#/$defs/nope"}, {"$ref": "http://x/y"}]),
    st.sampled_from([True, False, 0, "string", [], {"type": "integer", "minimum": 1}, {"not": {}}]),
    st.builds(
        lambda t, k, v: {"type": t, k: v},
        st.sampled_from(["integer", "number", ["integer", "null"]]),
        st.sampled_from(sorted(structured.BOUNDS) + ["multipleOf"]),
        st.sampled_from([0, 1, -1, 0.5, 10**20, "1", True]),
    ),
    st.sampled_from(["email", "ipv4", "ipv6", "uri"]).map(lambda f: {"type": ["string", "null"], "format": f}),
    st.just({"allOf": [{"$ref": "#"}]}),
)


def _children(inner):
    return st.one_of(
        st.builds(
            lambda d, req: {
                "type": "object",
                "properties": d,
                **({"required": sorted(d)[:1] if req else ["missing"]} if req is not None else {}),
            },
            st.dictionaries(st.text("abcxyz~/", min_size=1, max_size=3), inner, max_size=4),
            st.sampled_from([None, True, False]),
        ),
        st.builds(
            lambda i, lo, hi: {"type": "array", "items": i, "minItems": lo, "maxItems": hi}, inner, COUNTS, COUNTS
        ),
        st.lists(inner, min_size=0, max_size=3).map(lambda alts: {"anyOf": alts}),
        st.lists(inner, min_size=1, max_size=2).map(lambda items: {"type": "array", "prefixItems": items}),
        st.builds(lambda s: {"type": "object", "additionalProperties": s}, inner),
        st.lists(inner, min_size=0, max_size=3).map(lambda alts: {"oneOf": alts}),
        st.lists(inner, min_size=0, max_size=3).map(lambda alts: {"allOf": alts}),
    )


SCHEMAS = st.one_of(
    st.recursive(LEAVES, _children, max_leaves=12),
    st.sampled_from([1, 5, 31, 32, 33, 100, 400]).map(nested),
    st.sampled_from([10, 100, 101, 1000]).map(lambda n: props(n, required=False)),
    st.just(
        {
            "$defs": {
                "node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}}}
            },
            "$ref": "#/$defs/node",
        }
    ),
    st.just({"type": "object", "properties": {"self": {"$ref": "#"}}}),
    st.sampled_from([k[0] for k in KNOWN_BAD.values() if len(json.dumps(k[0])) < 100_000]),
)


def _answered(r: httpx.Response, param_prefix: str) -> None:
    assert r.status_code < 500, r.text[:500]
    event(f"{param_prefix}: {r.status_code} {r.json()['error']['code'] if r.status_code >= 400 else ''}")
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["param"], err
        if err["code"] in ("schema_too_large", "unsupported_parameter"):
            assert err["param"].startswith(param_prefix), err


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(schema=SCHEMAS, choice=st.sampled_from(["auto", "required", "act"]))
def test_generated_schemas_never_take_the_server_down(server, http, schema, choice):
    try:
        _answered(chat(http, response_format=as_format(schema)), "response_format")
        params = (
            schema
            if isinstance(schema, dict) and schema.get("type") == "object"
            else {"type": "object", "properties": {"x": schema}}
        )
        tool_choice = {"type": "function", "function": {"name": "act"}} if choice == "act" else choice
        _answered(chat(http, tools=as_tool(params), tool_choice=tool_choice), "tools")
    except httpx.TransportError as e:
        pytest.fail(f"the connection dropped ({e}); server alive: {server.alive()}\n{server.log()}")


def test_the_server_survived_the_fuzzing(server, http):
    assert server.alive(), server.log()
    assert chat(http).status_code == 200


# ---- calendar formats ------------------------------------------------------------------------------------------


class Matcher:
    """The server's own grammar engine (serve.backends.guides: llguidance over the served vocabulary), fed one
    character token at a time."""

    def __init__(self, gguf):
        self.lib = lib = llamacpp.runtime()
        params = lib.llama_model_default_params()
        params.vocab_only = True
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), params)
        self.vocab = lib.llama_model_get_vocab(self.model)
        n = lib.llama_vocab_n_tokens(self.vocab)
        self.eog = [t for t in range(n) if lib.llama_vocab_is_eog(self.vocab, t)]
        self.guides = Guides(self.vocab, n, self.eog)
        self.tokens, buf = {}, ctypes.create_string_buffer(16)
        for t in range(n):
            k = lib.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            piece = buf.raw[:k]
            if len(piece) == 1 and not lib.llama_vocab_is_control(self.vocab, t):
                self.tokens.setdefault(piece.decode("latin-1"), t)

    def ends(self, m) -> bool:
        """Whether the end of generation is allowed now, read off the mask as decoding reads it."""
        return bool(self.guides.masks([m])[0][self.eog].any())

    def admits(self, grammar: str, text: str) -> bool:
        """Whether the grammar admits exactly text (then the end of generation)."""
        m = self.guides.compile(grammar)
        for ch in text:
            if not m.consume_token(self.tokens[ch]):
                return False
        return self.ends(m)

    def walk(self, grammar: str, rng: random.Random, alphabet: str) -> str:
        """A random text the grammar admits, one allowed character at a time."""
        m, out = self.guides.compile(grammar), []
        while True:
            allowed = [c for c in alphabet if m.validate_tokens([self.tokens[c]]) == 1]
            if not allowed:
                assert self.ends(m), "".join(out)
                return "".join(out)
            c = rng.choice(allowed)
            out.append(c)
            assert m.consume_token(self.tokens[c])

    def step_cost(self, grammar: str, steps: int, avoid: str = "") -> float:
        """The slowest of `steps` token masks under the grammar, as the decode thread computes them, along a
        random path that keeps away from `avoid` (to stay inside a value)."""
        m, rng, worst = self.guides.compile(grammar), random.Random(0), 0.0
        for _ in range(steps):
            t = time.perf_counter()
            mask = self.guides.masks([m])[0]
            worst = max(worst, time.perf_counter() - t)
            allowed = [i for i in np.flatnonzero(mask).tolist() if i not in self.eog]
            inside = [i for i in allowed if not any(ch in self.piece(i) for ch in avoid)]
            if not allowed:
                break
            assert m.consume_token(rng.choice(inside or allowed))
        return worst

    def piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def close(self):
        self.lib.llama_model_free(self.model)


@pytest.fixture(scope="module")
def matcher(request):
    gguf, _ = serving.served_files(request)
    m = Matcher(gguf)
    yield m
    m.close()


def test_the_decode_threads_share_of_a_big_grammar_is_bounded(matcher):
    """The request thread compiles each request's grammar (LlamaCppBackend.compile_grammar); the decode thread copies
    the compiled matcher (LlamaBatch.start) and computes its mask every token: for the largest admitted schemas both
    cost the decode thread well under the half second a client may wait."""
    schema = big_format()["json_schema"]["schema"]
    grammar = structured.schema_grammar(schema)
    t = time.perf_counter()
    compiled = matcher.guides.compile(grammar)
    made = time.perf_counter() - t
    t = time.perf_counter()
    compiled.deep_copy()
    start = time.perf_counter() - t
    group, product = structured.MAX_GROUP_REPEAT, structured.MAX_REPEAT_PRODUCT
    worst = max(
        matcher.step_cost(structured.schema_grammar(pattern(p)), steps=40, avoid='"')
        for p in (
            f"^(a{{0,{product // group}}}){{0,{group}}}$",
            f"^(a?b?){{0,{group}}}$",
            f"^a{{0,{structured.MAX_REPEAT}}}$",
        )
    )
    values = [f"item-number-{i:05d}" for i in range(structured.MAX_ENUM_VALUES)]
    enum = matcher.step_cost(structured.schema_grammar({"enum": values}), steps=20)
    print(
        f"big grammar ({len(grammar):,} bytes): compiled in {made:.3f} s, copied in {start:.4f} s; "
        f"worst token under an admitted pattern {worst:.3f} s, under a 1 000-value enum {enum:.3f} s"
    )
    assert start < 0.25 and worst < 0.25 and enum < 0.25


def test_the_grammar_itself_is_bounded(monkeypatch):
    """The last line of defence: whatever the schema limits let through, a grammar past MAX_GRAMMAR_BYTES or
    MAX_GRAMMAR_RULES is refused before llama.cpp parses it."""
    schema = props(50, required=True)
    monkeypatch.setattr(structured.gbnf, "MAX_GRAMMAR_RULES", 20)  # where grammar() reads it
    with pytest.raises(structured.SchemaLimit, match="rules"):
        structured.schema_grammar(schema)


def fmt_grammar(fmt: str) -> str:
    return structured.schema_grammar({"type": "string", "format": fmt})


def test_feb_29_only_in_leap_years_and_no_year_zero(matcher):
    date = fmt_grammar("date")
    wrong = [y for y in range(1, 10000) if matcher.admits(date, f'"{y:04d}-02-29"') != calendar.isleap(y)]
    assert not wrong, wrong[:10]
    assert not matcher.admits(date, '"0000-01-01"')
    assert matcher.admits(date, '"0001-01-01"') and matcher.admits(date, '"9999-12-31"')


@pytest.mark.parametrize("year", [1900, 2000, 2023, 2024])
def test_every_month_has_its_own_length(matcher, year):
    date = fmt_grammar("date")
    for month in range(0, 14):
        for day in range(0, 33):
            try:
                datetime.date(year, month, day)
                valid = True
            except ValueError:
                valid = False
            assert matcher.admits(date, f'"{year}-{month:02d}-{day:02d}"') == valid, (year, month, day)


def test_times_are_real_times(matcher):
    time_g = fmt_grammar("time")
    for text, ok in [
        ("00:00:00Z", True),
        ("23:59:59+23:59", True),
        ("12:30:05.123456-05:00", True),
        ("12:30:05.1Z", True),
        ("24:00:00Z", False),
        ("23:60:00Z", False),
        ("23:59:60Z", False),
        ("12:30:05.1234567Z", False),
        ("12:30:05", False),
        ("12:30:05+24:00", False),
        ("12:30:05.Z", False),
    ]:
        assert matcher.admits(time_g, f'"{text}"') == ok, text


def test_random_walks_through_the_calendar_grammars_all_parse(matcher):
    alphabet = '0123456789-T:.Z+"'
    for fmt, parse in (
        ("date", datetime.date.fromisoformat),
        ("time", datetime.time.fromisoformat),
        ("date-time", datetime.datetime.fromisoformat),
    ):
        g, rng = fmt_grammar(fmt), random.Random(fmt)
        for _ in range(150):
            text = matcher.walk(g, rng, alphabet)
            value = json.loads(text)
            parse(value)  # raises on 5515-02-30


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampled_dates_through_the_server_are_real_dates(http, temperature):
    schema = formatted(day="date", at="date-time", t="time")
    seeds = [107, *range(1, 7)] if temperature else [107]
    for seed in seeds:
        r = chat(http, max_tokens=200, response_format=as_format(schema), temperature=temperature, seed=seed)
        assert r.status_code == 200, r.text
        reply = json.loads(r.json()["choices"][0]["message"]["content"])
        datetime.date.fromisoformat(reply["day"])
        datetime.datetime.fromisoformat(reply["at"])
        datetime.time.fromisoformat(reply["t"])


# ---- numeric bounds and internet formats -------------------------------------------------------------------------

BOUND_CASES = [
    {"minimum": 1, "maximum": 9},
    {"exclusiveMinimum": -3, "exclusiveMaximum": 12},
    {"minimum": -20, "exclusiveMaximum": -7},
    {"exclusiveMinimum": 0},
    {"maximum": -1},
    {"exclusiveMinimum": -1, "exclusiveMaximum": 0},
    {"minimum": 0, "maximum": 0},
    {"minimum": 99, "maximum": 1001},
]


def _within(value, bounds: dict) -> bool:
    return (
        value >= bounds.get("minimum", value)
        and value <= bounds.get("maximum", value)
        and ("exclusiveMinimum" not in bounds or value > bounds["exclusiveMinimum"])
        and ("exclusiveMaximum" not in bounds or value < bounds["exclusiveMaximum"])
    )


@pytest.mark.parametrize("bounds", BOUND_CASES)
def test_integer_bounds_are_exact(matcher, bounds):
    if not any(_within(i, bounds) for i in range(-30, 2000)):  # nothing to write: refused by name
        with pytest.raises(structured.SchemaError, match="between the bounds"):
            structured.schema_grammar({"type": "integer", **bounds})
        return
    g = structured.schema_grammar({"type": "integer", **bounds})
    wrong = [
        i
        for i in [*range(-30, 31), 98, 99, 100, 999, 1000, 1001, 1002, 12345]
        if matcher.admits(g, str(i)) != _within(i, bounds)
    ]
    assert not wrong, wrong
    assert not matcher.admits(g, "01") and not matcher.admits(g, "-0") and not matcher.admits(g, "1.0")


@pytest.mark.parametrize("bounds", BOUND_CASES)
def test_number_bounds_never_admit_a_value_outside(matcher, bounds):
    """Every decimal the grammar admits is inside; every x.5 inside is admitted (the grammar is exact up to the
    decimals it writes); the edges: -0.0, 0.0, 1.0, 0.01 and the like."""
    g = structured.schema_grammar({"type": "number", **bounds})
    texts = [f"{sign}{i}.{f}" for sign in ("", "-") for i in range(0, 14) for f in ("0", "5", "00", "01", "99")]
    texts += [str(i) for i in range(-14, 15)]
    for text in texts:
        value = float(text)
        if matcher.admits(g, text):
            assert _within(value, bounds), text
        elif text.endswith(".5") or "." not in text:
            assert not _within(value, bounds), text


def test_internet_formats_are_what_python_and_jsonschema_accept(matcher):
    import ipaddress

    import jsonschema

    check = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for text, ok in [
        ("192.168.0.1", True),
        ("255.255.255.255", True),
        ("256.1.1.1", False),
        ("01.2.3.4", False),
        ("1.2.3", False),
    ]:
        assert matcher.admits(fmt_grammar("ipv4"), f'"{text}"') == ok, text
    alphabets = {"ipv4": "0123456789.", "ipv6": "0123456789abcdef:", "email": "abz09.-_@+%", "uri": "az09:/.?%AF-_~@=&"}
    for fmt, alphabet in alphabets.items():
        g, rng = fmt_grammar(fmt), random.Random(fmt)
        for _ in range(100):
            value = json.loads(matcher.walk(g, rng, alphabet + '"'))
            check.check(value, fmt)  # raises FormatError
            if fmt.startswith("ip"):
                ipaddress.ip_address(value)


def test_enum_and_const_strings_with_escapes_stay_json(matcher):
    """A value holding a newline, a backslash or a quote is admitted only as its JSON text (json.dumps), never with
    the raw character inside the string (which no JSON parser reads)."""
    values = ["foo\nbar", "a\\b", 'q"x', "tab\there"]
    for schema in ({"enum": values}, *({"const": v} for v in values)):
        g = structured.schema_grammar(schema)
        for v in values if "enum" in schema else [schema["const"]]:
            assert matcher.admits(g, json.dumps(v)), (schema, v)
            raw = '"' + v + '"'
            if all(ch in matcher.tokens for ch in raw):
                assert not matcher.admits(g, raw), (schema, v)
