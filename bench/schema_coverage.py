"""JSON Schema coverage of structured output, counted on the official JSON Schema Test Suite.

Every schema of the suite's draft2020-12 and draft7 folders (optional/ left out; schemas whose $ref needs a
document from elsewhere skipped and counted) is asked for as a `response_format` json_schema reply, with a few
seeds, of three engines that decode the same GGUF:

- aegis: the real server (`python -m serve`) over HTTP, several requests at once;
- llamacpp: llama-cpp-python's own json_schema_to_grammar converter, unfiltered (no checks of ours), its grammar
  sampled by llama_cpp.Llama in a child process, so a native crash is counted instead of ending the benchmark;
- llguidance: llguidance's JSON-schema compiler, its token mask over the GGUF's own vocabulary applied to
  llama-cpp-python's logits (a logits processor), in a child process too.

Each schema falls in one category per engine (classify()):
  valid    every reply parses and validates against the schema (the `jsonschema` package, that draft; formats are
           annotations there, as the suite's required tests have them);
  refused  the engine declined the schema up front (a 4xx from the server; the converter or compiler raising);
           the keyword the refusal names is recorded;
  invalid  a complete reply that does not parse or does not validate (a broken promise);
  cut      no reply was invalid, but at least one stopped at max_tokens, so it could not be judged; cut-offs are
           neither valid nor invalid;
  error    5xx, a dropped connection, a crashed or hung child.

    python bench/schema_coverage.py --model RUN/export/NAME-f16.gguf [--seeds 2] [--max-tokens 64]
    python bench/schema_coverage.py            # the quickstart test run's GGUF, made if missing

The suite comes from the `jsonschema` source distribution (its json/tests/), fetched with pip into a cache
directory; it is never part of this repository.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import platform
import re
import select
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRAFTS = ("draft2020-12", "draft7")
ENGINES = ("aegis", "llamacpp", "llguidance")
CATEGORIES = ("valid", "refused", "invalid", "cut", "error")
SUITE_VERSION = "4.26.0"  # the jsonschema sdist whose json/tests/ is the suite
MESSAGES = [
    {"role": "system", "content": "Reply with one JSON value only."},
    {"role": "user", "content": "Give an example value."},
]
CHILD_TIMEOUT_S = 120.0
# JSON Schema keywords, to name the one a refusal is about when its message has no JSON pointer
KEYWORDS = sorted(
    {
        "$ref",
        "$dynamicRef",
        "$recursiveRef",
        "$anchor",
        "$dynamicAnchor",
        "additionalItems",
        "additionalProperties",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
        "const",
        "contains",
        "maxContains",
        "minContains",
        "dependencies",
        "dependentRequired",
        "dependentSchemas",
        "enum",
        "exclusiveMaximum",
        "exclusiveMinimum",
        "maximum",
        "minimum",
        "format",
        "if",
        "then",
        "else",
        "items",
        "prefixItems",
        "maxItems",
        "minItems",
        "maxLength",
        "minLength",
        "maxProperties",
        "minProperties",
        "multipleOf",
        "pattern",
        "patternProperties",
        "properties",
        "propertyNames",
        "required",
        "type",
        "uniqueItems",
        "unevaluatedItems",
        "unevaluatedProperties",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
        "$defs",
        "definitions",
        "$id",
        "$schema",
        "$vocabulary",
    },
    key=len,
    reverse=True,
)


# ---- the suite ------------------------------------------------------------------------------------------------


def suite_dir(cache: Path) -> Path:
    """json/tests of the jsonschema sdist, downloaded with pip and unpacked under cache once."""
    root = cache / f"jsonschema-{SUITE_VERSION}" / "json" / "tests"
    if root.is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"jsonschema=={SUITE_VERSION}",
            "-d",
            str(cache),
        ],
        check=True,
    )
    with tarfile.open(cache / f"jsonschema-{SUITE_VERSION}.tar.gz") as tar:
        members = [m for m in tar.getmembers() if "/json/tests/" in m.name and m.isfile()]
        tar.extractall(cache, members=members, filter="data")
    return root


def load_cases(tests: Path, drafts=DRAFTS) -> tuple[list[dict], list[dict]]:
    """(cases, skipped): one case per schema (test group) of each draft's top folder; skipped are those whose
    references need a document the schema does not hold."""
    cases, skipped = [], []
    for draft in drafts:
        for path in sorted((tests / draft).glob("*.json")):
            for i, group in enumerate(json.loads(path.read_text())):
                case = {
                    "id": f"{draft}/{path.stem}/{i}",
                    "draft": draft,
                    "keyword": path.stem,
                    "description": group["description"],
                    "schema": group["schema"],
                    "instances": [t["data"] for t in group["tests"]],
                }
                (skipped if needs_remote(case) else cases).append(case)
    return cases, skipped


def _validator(draft: str, schema):
    import jsonschema

    cls = jsonschema.Draft202012Validator if draft == "draft2020-12" else jsonschema.Draft7Validator
    return cls(schema)


def needs_remote(case: dict) -> bool:
    """Whether validating the suite's own instances reaches a reference the validator cannot resolve offline (the
    metaschemas it ships count as resolvable)."""
    import referencing.exceptions

    try:
        validator = _validator(case["draft"], case["schema"])
        for data in case["instances"]:
            validator.is_valid(data)
    except referencing.exceptions.Unresolvable:
        return True
    return False


# ---- classification -------------------------------------------------------------------------------------------


def refused_keyword(message: str) -> str | None:
    """The keyword a refusal names: the last name of its first JSON pointer (`/properties/a/oneOf: ...`), else the
    first JSON Schema keyword the message mentions."""
    m = re.search(r"(?:^|[\s:])(/[^\s:]*):", message)
    if m:
        parts = [p for p in m.group(1).split("/") if p and not p.isdigit()]
        if parts and parts[-1] in KEYWORDS:
            return parts[-1]
    for word in KEYWORDS:
        if re.search(rf"(?<![\w$]){re.escape(word)}(?!\w)", message):
            return word
    return None


def judge(draft: str, schema, text: str) -> str | None:
    """None if text is JSON that validates against schema under that draft, else why not."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON: {e}"
    errors = sorted(_validator(draft, schema).iter_errors(value), key=lambda e: list(e.path))
    return None if not errors else f"does not validate: {errors[0].message[:200]}"


def classify(draft: str, schema, outcomes: list[dict]) -> dict:
    """One engine's category for one schema from its outcomes, one per seed tried. An outcome is
    {"status": HTTP-like code or None (no answer), "text": the reply, "finish": "stop" | "length", "error": str}.
    Precedence: error, refused, invalid, cut, valid (a refusal ends the seeds, so it is never mixed with replies)."""
    details = []
    for o in outcomes:
        status = o.get("status")
        if status is None or status >= 500:
            return {"category": "error", "detail": o.get("error") or f"status {status}"}
        if 400 <= status < 500:
            message = o.get("error") or ""
            return {"category": "refused", "refused_keyword": refused_keyword(message), "detail": message[:300]}
    for o in outcomes:
        if o.get("finish") == "length":
            details.append(("cut", "stopped at max_tokens"))
            continue
        why = judge(draft, schema, o.get("text") or "")
        if why:
            details.append(("invalid", f"{why}; reply {o.get('text', '')[:120]!r}"))
    for category in ("invalid", "cut"):
        hits = [d for c, d in details if c == category]
        if hits:
            return {"category": category, "detail": hits[0]}
    return {"category": "valid"}


# ---- engines --------------------------------------------------------------------------------------------------


def _aegis_one(client, url: str, model: str, case: dict, seeds: list[int], max_tokens: int) -> list[dict]:
    import httpx

    outcomes = []
    for seed in seeds:
        body = {
            "model": model,
            "messages": MESSAGES,
            "max_tokens": max_tokens,
            "seed": seed,
            "temperature": 1.0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "case", "schema": case["schema"]}},
        }
        try:
            r = client.post(url + "/v1/chat/completions", json=body, timeout=CHILD_TIMEOUT_S)
        except httpx.HTTPError as e:
            outcomes.append({"status": None, "error": f"{type(e).__name__}: {e}"})
            break
        if r.status_code != 200:
            try:
                err = r.json().get("error", {})
                message = err.get("message", "") if isinstance(err, dict) else str(err)
            except ValueError:
                message = r.text[:300]
            outcomes.append({"status": r.status_code, "error": message})
            break
        choice = r.json()["choices"][0]
        outcomes.append(
            {"status": 200, "text": choice["message"].get("content") or "", "finish": choice.get("finish_reason")}
        )
    return outcomes


def run_aegis(gguf: Path, cases: list[dict], seeds: list[int], max_tokens: int, workers: int, log) -> dict:
    import httpx

    sys.path.insert(0, str(REPO))
    from tests.support.serving import Server

    logfile = Path(tempfile.gettempdir()) / "schema_coverage_serve.log"
    with (
        Server(
            "--model",
            str(gguf),
            "--ctx-size",
            "2048",
            "--parallel",
            str(workers),
            "--queue-size",
            "256",
            log_path=logfile,
        ) as server,
        httpx.Client() as client,
    ):
        model = client.get(server.api + "/models").json()["data"][0]["id"]
        results = {}
        with cf.ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(_aegis_one, client, server.url, model, c, seeds, max_tokens): c for c in cases}
            for n, fut in enumerate(cf.as_completed(futures), 1):
                results[futures[fut]["id"]] = fut.result()
                if n % 100 == 0:
                    log(f"aegis: {n}/{len(cases)}")
    return results


class Child:
    """`schema_coverage.py child ENGINE GGUF`: schemas in on stdin, outcomes out on stdout, a JSON line each."""

    def __init__(self, engine: str, gguf: Path, seeds: list[int], max_tokens: int):
        self.cmd = [
            sys.executable,
            __file__,
            "child",
            engine,
            str(gguf),
            "--seeds",
            ",".join(map(str, seeds)),
            "--max-tokens",
            str(max_tokens),
        ]
        self.proc = None

    def ask(self, schema) -> list[dict]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=REPO,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        try:
            self.proc.stdin.write(json.dumps(schema) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        ready, _, _ = select.select([self.proc.stdout], [], [], CHILD_TIMEOUT_S)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            return [{"status": None, "error": f"no answer within {CHILD_TIMEOUT_S:.0f} s (killed)"}]
        line = self.proc.stdout.readline()
        return json.loads(line) if line else self._died()

    def _died(self) -> list[dict]:
        code = self.proc.wait()
        return [{"status": None, "error": f"child died ({'signal ' + str(-code) if code < 0 else code})"}]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


def run_child_engine(
    engine: str, gguf: Path, cases: list[dict], seeds: list[int], max_tokens: int, log, budget_s: float = 0
) -> dict:
    """Outcomes per case id; with budget_s, the cases not reached by then are left out (the report says so)."""
    child, results, t0 = Child(engine, gguf, seeds, max_tokens), {}, time.monotonic()
    try:
        for n, case in enumerate(cases, 1):
            if budget_s and time.monotonic() - t0 > budget_s:
                log(f"{engine}: out of time after {n - 1} schemas")
                break
            results[case["id"]] = child.ask(case["schema"])
            if n % 100 == 0:
                log(f"{engine}: {n}/{len(cases)}")
    finally:
        child.close()
    return results


def child_main(engine: str, gguf: str, seeds: list[int], max_tokens: int) -> None:
    """The child's side: one Llama, then per schema its grammar (or the refusal) and a reply per seed. Both
    engines sample as the server does: the constraint, then temperature 1 over the whole vocabulary (no top-k,
    top-p or min-p), seeded."""
    sys.path.insert(0, str(REPO))
    from aegis import llamacpp

    llama_cpp = llamacpp.runtime()
    llamacpp.quiet()
    from llama_cpp.llama_grammar import LlamaGrammar

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=2048, n_threads=1, verbose=False)
    tokenizer = prompt = None
    for line in sys.stdin:
        schema = json.loads(line)
        outcomes = []
        try:
            if engine == "llamacpp":
                grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
            else:
                import llguidance
                import llguidance.llamacpp

                if tokenizer is None:
                    tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(llm._model.vocab)
                    prompt = _prompt_ids(llm)
                compiled = llguidance.LLMatcher.grammar_from_json_schema(schema)
                is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled, tokenizer)
                if is_error:
                    raise ValueError(messages[0])
        except Exception as e:  # noqa: BLE001 - the converter or compiler refusing the schema
            outcomes.append({"status": 400, "error": f"{type(e).__name__}: {e}"[:500]})
        else:
            for seed in seeds:
                try:
                    if engine == "llamacpp":
                        out = llm.create_chat_completion(
                            MESSAGES,
                            max_tokens=max_tokens,
                            temperature=1.0,
                            top_k=0,
                            top_p=1.0,
                            min_p=0.0,
                            seed=seed,
                            grammar=grammar,
                        )
                        text, finish = out["choices"][0]["message"]["content"] or "", out["choices"][0]["finish_reason"]
                    else:
                        text, finish = _guided(llm, llguidance, tokenizer, compiled, prompt, seed, max_tokens)
                except Exception as e:  # noqa: BLE001 - a failure while sampling is the engine's error
                    outcomes.append({"status": 500, "error": f"{type(e).__name__}: {e}"[:500]})
                    break
                outcomes.append({"status": 200, "text": text, "finish": finish})
        print(json.dumps(outcomes), flush=True)


def _prompt_ids(llm) -> list[int]:
    """MESSAGES through the GGUF's chat template, as llama-cpp-python's chat completion reads them."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    piece = lambda t: llm.detokenize([t], special=True).decode()  # noqa: E731
    formatted = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"],
        eos_token=piece(llm.token_eos()),
        bos_token=piece(llm.token_bos()),
        add_generation_prompt=True,
    )(messages=MESSAGES)
    return llm.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)


def _guided(llm, llguidance, tokenizer, compiled: str, prompt: list[int], seed: int, max_tokens: int):
    """One reply under llguidance's token mask: (text, "stop" | "length"). llama-cpp-python's own logits-processor
    hook does not reach its sampler chain here (the mask was ignored), so the loop is ours: mask, softmax at
    temperature 1, a draw from a generator seeded with `seed`."""
    import numpy as np

    matcher = llguidance.LLMatcher(tokenizer, compiled)
    rng = np.random.default_rng(seed)
    n_vocab, eos = llm.n_vocab(), llm.token_eos()
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        if matcher.is_error():
            raise RuntimeError(f"llguidance: {matcher.get_error()}")
        allowed = bits[:n_vocab].astype(bool)
        if not allowed.any():
            raise RuntimeError("llguidance: no token allowed")
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        logits[~allowed] = -np.inf
        p = np.exp(logits - logits.max())
        token = int(rng.choice(n_vocab, p=p / p.sum()))
        if token == eos:
            break
        matcher.consume_token(token)
        out.append(token)
        if matcher.is_stopped():
            break
        llm.eval([token])
    else:
        return llm.detokenize(out).decode("utf-8", errors="replace"), "length"
    return llm.detokenize(out).decode("utf-8", errors="replace"), "stop"


# ---- report ---------------------------------------------------------------------------------------------------


def tally(results: dict) -> dict:
    """{engine: {keyword: Counter(category)}} plus per-draft totals under the key "(draft) total"."""
    out = {}
    for engine, per_case in results.items():
        counts = defaultdict(Counter)
        for case in per_case.values():
            counts[case["keyword"]][case["category"]] += 1
            counts[f"({case['draft']}) total"][case["category"]] += 1
        out[engine] = counts
    return out


def refusals(results: dict) -> dict[str, Counter]:
    """{engine: Counter(the keyword each refusal names, "?" where it names none)}."""
    return {
        engine: Counter(c.get("refused_keyword") or "?" for c in per_case.values() if c["category"] == "refused")
        for engine, per_case in results.items()
    }


def markdown(results: dict) -> str:
    counts = tally(results)
    engines = [e for e in ENGINES if e in counts]
    keys = sorted({k for c in counts.values() for k in c}, key=lambda k: (k.startswith("("), k.lower()))
    head = "| keyword | " + " | ".join(f"{e} v/r/i/c/e" for e in engines) + " |"
    rows = [head, "|" + "---|" * (len(engines) + 1)]
    for key in keys:
        cells = ["/".join(str(counts[e][key][c]) for c in CATEGORIES) for e in engines]
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["child"]:
        p = argparse.ArgumentParser()
        p.add_argument("child")
        p.add_argument("engine", choices=("llamacpp", "llguidance"))
        p.add_argument("gguf")
        p.add_argument("--seeds", required=True)
        p.add_argument("--max-tokens", type=int, required=True)
        a = p.parse_args()
        child_main(a.engine, a.gguf, [int(s) for s in a.seeds.split(",")], a.max_tokens)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="the GGUF (default: the quickstart test run's f16 export)")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--drafts", default=",".join(DRAFTS))
    p.add_argument("--seeds", type=int, default=2, help="replies asked per schema (seeds 1..N)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="requests in flight to the server")
    p.add_argument("--limit", type=int, default=0, help="only the first N schemas (a quick try)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="seconds each child engine may take; the schemas it "
        "has not reached by then are left out and counted as not run (0: no limit)",
    )
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aegis-schema-suite")
    p.add_argument("--out", type=Path, default=REPO / "bench" / f"schema_coverage_{dt.date.today()}.json")
    a = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.model is None:
        sys.path.insert(0, str(REPO))
        from tests.support.serving import exported_run, find_gguf

        a.model = find_gguf(exported_run(Path(tempfile.gettempdir()) / "aegis-serve"))
    cases, skipped = load_cases(suite_dir(a.cache), a.drafts.split(","))
    cases = cases[: a.limit] if a.limit else cases
    seeds = list(range(1, a.seeds + 1))
    log(f"{len(cases)} schemas ({len(skipped)} skipped: remote references), seeds {seeds}, model {a.model}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    # the server runs from the working tree: serve/ files changed since that commit are named
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "serve"], cwd=REPO, capture_output=True, text=True
    ).stdout.split("\n")
    by_id = {c["id"]: c for c in cases}
    results, timings = {}, {}
    engines = a.engines.split(",")

    def one(engine):
        t0 = time.monotonic()
        if engine == "aegis":
            raw = run_aegis(a.model, cases, seeds, a.max_tokens, a.workers, log)
        else:
            raw = run_child_engine(engine, a.model, cases, seeds, a.max_tokens, log, a.budget_s)
        timings[engine] = round(time.monotonic() - t0, 1)
        results[engine] = {
            cid: {
                "draft": by_id[cid]["draft"],
                "keyword": by_id[cid]["keyword"],
                **classify(by_id[cid]["draft"], by_id[cid]["schema"], outs),
                "outcomes": [
                    {k: (v[:200] if isinstance(v, str) else v) for k, v in o.items()}
                    for o in outs
                    if o.get("status") == 200
                ],
            }
            for cid, outs in raw.items()
        }
        log(f"{engine}: done in {timings[engine]} s")

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(len(engines)) as pool:  # the engines run side by side, each its own process
        list(pool.map(one, engines))
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "serve_uncommitted": [line[3:] for line in dirty if line.strip()],
        "cpu": _cpu(),
        "command": " ".join(["python", "bench/schema_coverage.py", *(argv or sys.argv[1:])]),
        "model": str(a.model),
        "suite": f"jsonschema {SUITE_VERSION} sdist json/tests",
        "seeds": seeds,
        "max_tokens": a.max_tokens,
        "schemas": len(cases),
        "not_run": {e: len(cases) - len(r) for e, r in results.items()},
        "skipped_remote": [c["id"] for c in skipped],
        "seconds": {**timings, "total": round(time.monotonic() - t0, 1)},
        "counts": {e: {k: dict(v) for k, v in c.items()} for e, c in tally(results).items()},
        "results": results,
    }
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(a.out)
    print(markdown(results))
    for engine, words in refusals(results).items():
        print(f"{engine} refusals by keyword: " + ", ".join(f"{w} {n}" for w, n in words.most_common()))
    return 0


def _cpu() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
