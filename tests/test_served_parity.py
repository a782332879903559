"""Served = checked: `python -m serve` with its default settings answers export's parity prompts, at temperature 0,
with exactly the tokens export's parity decoded and recorded in parity.json, for the quickstart model's GGUF that the
serve tests use (the embedded tiny Phi-3: LongRoPE, original context 512, context length 2048).

The same server given the old default context, 2048, says at start-up what that changes (llama.cpp then applies
LongRoPE's long rope factors to every prompt) and answers some of the prompts differently: the check below tells
the two apart."""

from __future__ import annotations

import json

import httpx
import pytest

from aegis import gguf_context, llamacpp
from export import prompts
from support import serving


@pytest.fixture(scope="module")
def checked(request) -> tuple:
    """(GGUF, its parity.json entry, the recorded replies, {token: the bytes it stands for})."""
    gguf, _ = serving.served_files(request)
    entry = json.loads((gguf.parent / "parity.json").read_text())[gguf.name]
    replies = entry.get("replies")
    assert replies and {"prose", "short0", "chat"} <= set(replies), "export's parity recorded no greedy replies"
    llm = llamacpp.open_vocab(gguf)
    try:
        pieces = {t: llamacpp.piece(llm._model.vocab, t) for r in replies.values() for t in r["ids"]}
    finally:
        llm.close()
    return gguf, entry, replies, pieces


def served_replies(server: serving.Server, replies: dict) -> dict:
    """{label: (token texts, text)} as the server answers each recorded prompt, greedy, for as many tokens as were
    recorded: the chat through /v1/chat/completions (the server renders the template), the rest through
    /v1/completions with the recorded token ids."""
    out = {}
    for label, r in replies.items():
        common = {"model": "tiny", "max_tokens": len(r["ids"]), "temperature": 0, "ignore_eos": True}
        if label == "chat":
            body = httpx.post(
                server.api + "/chat/completions",
                timeout=120,
                json={**common, "messages": prompts.CHAT, "logprobs": True},
            ).json()
            choice = body["choices"][0]
            tokens = [bytes(e["bytes"]) for e in choice["logprobs"]["content"]]
            text = choice["message"]["content"]
        else:
            body = httpx.post(
                server.api + "/completions", timeout=120, json={**common, "prompt": r["prompt"], "logprobs": 0}
            ).json()
            choice = body["choices"][0]
            tokens, text = choice["logprobs"]["tokens"], choice["text"]
        assert body["usage"]["prompt_tokens"] == len(r["prompt"]), (label, body["usage"])
        assert body["usage"]["completion_tokens"] == len(r["ids"]), (label, body["usage"])
        out[label] = (tokens, text)
    return out


def expected(r: dict, pieces: dict, as_bytes: bool) -> tuple:
    """(token texts, or bytes as the chat's logprobs give them; text) of the recorded reply."""
    raw = [pieces[t] for t in r["ids"]]
    return ([p if as_bytes else p.decode("utf-8", "replace") for p in raw], b"".join(raw).decode("utf-8", "replace"))


def differing(served: dict, replies: dict, pieces: dict) -> list[str]:
    return [label for label, r in replies.items() if served[label] != expected(r, pieces, label == "chat")]


def server(gguf, tmp_path_factory, *args: str) -> serving.Server:
    """`python -m serve --model tiny=GGUF` and nothing else unless given (threads, slots, context: the defaults)."""
    log = tmp_path_factory.mktemp("serve") / "served.log"
    return serving.Server("--model", f"tiny={gguf}", *args, log_path=log)


def test_default_server_replies_are_the_tokens_export_checked(checked, tmp_path_factory):
    gguf, entry, replies, pieces = checked
    assert entry["served_context"] == gguf_context.context(gguf).default == 512
    with server(gguf, tmp_path_factory) as s:
        assert httpx.get(s.api + "/models").json()["data"][0]["context_length"] == 512
        served = served_replies(s, replies)
        assert "WARNING" not in s.log(), s.log()
    assert differing(served, replies, pieces) == []


def test_a_larger_context_warns_and_is_what_the_check_catches(checked, tmp_path_factory):
    """The old default (2048) for the same file: a WARNING line at start-up names the long factors, and the check
    above fails (on the quickstart run five of the six recorded replies come out different)."""
    gguf, _, replies, pieces = checked
    with server(gguf, tmp_path_factory, "--ctx-size", "2048") as s:
        served = served_replies(s, replies)
        log = s.log()
    assert "WARNING" in log and "--ctx-size 2048" in log and "long rope factors to every prompt" in log, log
    assert differing(served, replies, pieces), "the long factors changed no reply: the check proves nothing"
