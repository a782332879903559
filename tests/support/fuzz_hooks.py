"""schemathesis hooks for fuzzing this API (SCHEMATHESIS_HOOKS=tests.support.fuzz_hooks).

Bodies whose generated `model` has an even length are pointed at the served model (AEGIS_FUZZ_MODEL), so the fuzzer
reaches prompt building and generation instead of meeting the 404 for an unknown model every time; the others keep
their random name, so the 404 path is fuzzed too. max_tokens (and max_completion_tokens) above 64 is folded into
1..64 to keep a run short; invalid values are sent as generated."""

from __future__ import annotations

import os

import schemathesis


@schemathesis.hook
def before_call(context, case, kwargs):  # noqa: ARG001 - the signature schemathesis calls
    body = case.body
    if not isinstance(body, dict):
        return
    model = body.get("model")
    if isinstance(model, str) and len(model) % 2 == 0:
        body["model"] = os.environ.get("AEGIS_FUZZ_MODEL", "tiny")
    for key in ("max_tokens", "max_completion_tokens"):
        tokens = body.get(key)
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 64:
            body[key] = 1 + tokens % 64
