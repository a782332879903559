"""--speculate N (prompt lookup): greedy replies are token for token those of plain decoding, alone and side by side;
a reply that repeats its prompt has its drafts accepted in fewer decode steps, and /metrics counts drafted and
accepted tokens; sampled and grammar-constrained requests never draft. --draft-model (the model itself, or another
model of the same vocabulary) gives the same replies, its acceptance rate in /metrics; a draft of another
vocabulary is refused before the server starts."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys

import openai
import pytest

from aegis.tiny import corpus_path
from serve.speculate import REST, Drafter
from support import serving
from support.serving import REPO, base_gguf, metric

CHATS = [
    "日本の四季について説明してください。",
    "こんにちは。今日はどんなことを手伝ってくれますか。",
    "梅雨の時期に洗濯物を上手に乾かすには？",
]

# a chat's next turn: its prompt ends as the turn before did ("<|end|>", the assistant's marker), so prompt lookup
# drafts from the first step on
TURNS = [
    {"role": "user", "content": CHATS[0]},
    {"role": "assistant", "content": "春は桜、夏は海、秋は紅葉、冬は雪です。"},
    {"role": "user", "content": CHATS[1]},
]


def _prose(cut: int = 100) -> str:
    """A passage of the model's training prose, then its start again: the model goes on to write the passage once
    more (for a while), which prompt lookup finds in the prompt."""
    text = corpus_path("prose_train_a.txt").read_text(encoding="utf-8")[:300]
    return text + text[:cut]


@pytest.fixture(scope="module")
def servers(request, tmp_path_factory):
    with contextlib.ExitStack() as stack:
        # the model's original context (beyond it the long rope factors apply and it copies its prompt less well)
        yield {
            n: stack.enter_context(
                serving.tiny_server(
                    request, tmp_path_factory, "--speculate", str(n), "--ctx-size", "512", name=f"tiny-spec{n}"
                )
            )
            for n in (0, 4)
        }


def _requests(name: str) -> list[tuple[str, dict]]:
    """Chats with logprobs and prose to go on with, each long enough that drafts are kept and refused mid-reply."""
    greedy = dict(model=name, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    chats = [
        ("chat", greedy | dict(messages=[{"role": "user", "content": c}], logprobs=True)) for c in [*CHATS, _prose(0)]
    ] + [("chat", greedy | dict(messages=TURNS, logprobs=True))]
    return [*chats, *(("completion", greedy | dict(prompt=_prose(cut))) for cut in (60, 100, 150))]


async def _send(server, requests: list[tuple[str, dict]]) -> list[tuple[str, list]]:
    """(text, [(token, logprob)] of a chat) of each request, all sent at once."""
    async with openai.AsyncOpenAI(base_url=server.api, api_key="none", max_retries=0, timeout=120) as c:
        calls = [
            c.chat.completions.create(**args) if kind == "chat" else c.completions.create(**args)
            for kind, args in requests
        ]
        replies = await asyncio.gather(*calls)
    out = []
    for reply in replies:
        choice = reply.choices[0]
        if hasattr(choice, "message"):
            out.append((choice.message.content, [(t.token, t.logprob) for t in choice.logprobs.content]))
        else:
            out.append((choice.text, []))
    return out


def _name(server) -> str:
    return server.args[server.args.index("--model") + 1].split("=")[0]


def test_greedy_replies_are_those_of_plain_decoding(servers):
    plain, fast = servers[0], servers[4]
    drafted, accepted = metric(fast, "aegis_draft_tokens_total"), metric(fast, "aegis_draft_accepted_tokens_total")
    expected = [asyncio.run(_send(plain, [r]))[0] for r in _requests(_name(plain))]  # one at a time
    for together in (False, True):
        requests = _requests(_name(fast))
        got = asyncio.run(_send(fast, requests)) if together else [asyncio.run(_send(fast, [r]))[0] for r in requests]
        for (text, probs), (want_text, want_probs) in zip(got, expected):
            assert text == want_text
            # each token's logprob comes from the logits row of the position it was sampled at: llama.cpp sums a
            # batch of several rows in another order than one, so the figures agree to about 1e-3 (a row off by one
            # position would give the token's logprob at another position, far away)
            assert [t for t, _ in probs] == [t for t, _ in want_probs]
            assert all(abs(a - b) < 1e-2 for (_, a), (_, b) in zip(probs, want_probs)), (probs, want_probs)
    # both paths were taken: drafts kept, and drafts refused (then taken out of the slot's cells)
    drafted = metric(fast, "aegis_draft_tokens_total") - drafted
    accepted = metric(fast, "aegis_draft_accepted_tokens_total") - accepted
    assert 0 < accepted < drafted, (accepted, drafted)


def test_a_reply_that_repeats_its_prompt_takes_fewer_steps(servers):
    fast = servers[4]
    before = {
        m: metric(fast, m)
        for m in ("aegis_draft_tokens_total", "aegis_draft_accepted_tokens_total", "aegis_decode_steps_total")
    }
    reply = serving.openai_client(fast).completions.create(
        model=_name(fast), prompt=_prose(), max_tokens=40, temperature=0
    )
    drafted, accepted, steps = (metric(fast, m) - v for m, v in before.items())
    assert 10 <= accepted <= drafted, (drafted, accepted)
    # plain decoding takes a step per token (and one more for the prompt): here many steps give several tokens
    assert steps < reply.usage.completion_tokens, (steps, reply.usage.completion_tokens)


def test_speculating_on_the_cpu_says_what_it_costs(servers):
    """On a CPU a drafted token costs about a token's compute: the server says so at start, and only when drafting."""
    said = {n: server.log_path.read_text(errors="replace") for n, server in servers.items()}
    assert "--speculate 4 on the CPU: a drafted token costs" in said[4]
    assert "on the CPU: a drafted token costs" not in said[0]


def test_sampled_and_constrained_requests_do_not_draft(servers):
    fast = servers[4]
    client = serving.openai_client(fast)
    drafted = metric(fast, "aegis_draft_tokens_total")
    client.chat.completions.create(model=_name(fast), messages=TURNS, max_tokens=24, temperature=0.8, seed=1)
    client.chat.completions.create(
        model=_name(fast), messages=TURNS, max_tokens=24, temperature=0, response_format={"type": "json_object"}
    )
    assert metric(fast, "aegis_draft_tokens_total") == drafted


def test_the_draft_length_follows_what_was_kept():
    d = Drafter([1, 2, 3, 1, 2], most=4)
    assert d.want() == 4 and d.draft(d.want()) == [3, 1, 2]  # "1 2" came before, followed by "3 1 2"
    d.kept(4, 4)
    assert d.want() == 4  # never more than --speculate
    d.kept(4, 1)
    assert d.want() == 3
    d.kept(3, 0)
    d.kept(2, 1)
    assert d.want() == 1
    d.kept(1, 0)  # even one token refused: a rest
    assert [d.want() for _ in range(REST)] == [0] * REST and d.want() == 1
    d.kept(1, 1)
    assert d.want() == 3
    d.kept(0, 0)  # nothing drafted (no n-gram matched): nothing learnt
    assert d.want() == 3


@pytest.fixture(scope="module")
def draft_servers(request, tmp_path_factory):
    """The model drafting for itself, and the base model of the same run (same vocabulary, other weights)."""
    gguf, _ = serving.served_files(request)
    drafts = {"self": gguf, "base": base_gguf(serving.run_for_tests(request))}
    with contextlib.ExitStack() as stack:
        yield {
            kind: stack.enter_context(
                serving.tiny_server(
                    request,
                    tmp_path_factory,
                    "--speculate",
                    "4",
                    "--draft-model",
                    str(path),
                    "--ctx-size",
                    "512",
                    name=f"tiny-draft-{kind}",
                )
            )
            for kind, path in drafts.items()
        }


def test_a_draft_model_gives_the_replies_of_plain_decoding(servers, draft_servers):
    plain = servers[0]
    expected = [asyncio.run(_send(plain, [r]))[0] for r in _requests(_name(plain))]
    rates = {}
    for kind, server in draft_servers.items():
        got = asyncio.run(_send(server, _requests(_name(server))))  # all at once: the draft decodes them together
        for (text, probs), (want_text, want_probs) in zip(got, expected):
            assert text == want_text, kind
            assert [t for t, _ in probs] == [t for t, _ in want_probs], kind
        drafted = metric(server, "aegis_draft_tokens_total")
        accepted = metric(server, "aegis_draft_accepted_tokens_total")
        assert 0 < accepted <= drafted, (kind, accepted, drafted)
        rates[kind] = metric(server, "aegis_draft_acceptance_rate")
        assert rates[kind] == pytest.approx(accepted / drafted), kind
    # the model agrees with itself nearly always (batches of other shapes sum in another order); the base less often
    assert rates["self"] > 0.9 and rates["base"] < rates["self"], rates


def test_a_draft_model_of_another_vocabulary_is_refused(request, tmp_path):
    gguf, _ = serving.served_files(request)
    other = tmp_path / "other.gguf"
    shutil.copy(gguf, other)
    import gguf as gguf_py

    reader = gguf_py.GGUFReader(str(other), "r+")
    field = reader.fields["tokenizer.ggml.tokens"]
    field.parts[field.data[300]][:] = ord("Z")  # one token's text, in place
    reader.data.flush()
    del reader
    done = subprocess.run(
        [sys.executable, "-m", "serve", "--model", str(gguf), "--speculate", "4", "--draft-model", str(other)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(other) in lines[0] and "vocabulary" in lines[0] and "token 300" in lines[0], lines
