"""The API end to end: a real server process on loopback serving the GGUF of a real (short) training run of the
embedded model, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai
import pytest

from support.fixtures import served_files  # noqa: F401 - a fixture
from support.serving import Server, metric

KEY = "test-key-5f2c"
CHAT = [
    {"role": "system", "content": "あなたは親切なアシスタントです。"},
    {"role": "user", "content": "こんにちは。今日の天気はどうですか。"},
]


@pytest.fixture(scope="module")
def server(served_files, tmp_path_factory):
    gguf, _ = served_files
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # the embedded model's whole context (serve's default is its original 512): room for 2000-token generations
    with Server(
        "--model", f"tiny={gguf}", "--parallel", "2", "--threads", "1", "--ctx-size", "2048", api_key=KEY, log_path=log
    ) as s:
        yield s
        assert s.alive(), f"the server died during the tests:\n{s.log()}"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(served_files):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served_files[1])


# ---- the happy paths ------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["context_length"] == 2048
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_uses_the_models_template_and_counts_tokens(client, tokenizer):
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    # the prompt is the model's own chat template, tokenized by the model: HF's rendering has the same length
    expected = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert r.usage.prompt_tokens == len(expected)
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == len(expected) + 8
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.strip()
    assert "<|" not in r.choices[0].message.content  # no special token text leaks into the reply


def test_stream_matches_non_stream(client):
    args = dict(model="tiny", messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # really streamed


def test_generation_ends_at_end_of_turn(client):
    # sampled replies end on the model's end-of-turn token (finish_reason stop) before the limit, and no special
    # token's text ever reaches the client
    finishes = []
    for seed in range(6):
        r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=200, temperature=0.8, seed=seed)
        finishes.append((r.choices[0].finish_reason, r.usage.completion_tokens))
        assert "<|" not in r.choices[0].message.content
    assert any(reason == "stop" and n < 200 for reason, n in finishes), finishes


def test_completions(client):
    args = dict(model="tiny", prompt="昔々、ある村に", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(**args)
    assert r.object == "text_completion"
    assert r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **args) if c.choices)
    assert streamed == r.choices[0].text


def test_stop_sequences_cut_the_reply(client):
    args = dict(model="tiny", messages=CHAT, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**args).choices[0].message.content
    assert len(full) > 6
    stop = full[4:6]
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(stop=["@@never@@", stop], **args)
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stop=stop, stream=True, **args)
        if c.choices
    )
    assert streamed == cut


def test_seed_makes_sampling_repeatable(client):
    args = dict(model="tiny", messages=CHAT, max_tokens=16, temperature=1.0, seed=1234)
    first = client.chat.completions.create(**args).choices[0].message.content
    assert client.chat.completions.create(**args).choices[0].message.content == first


# ---- bad input: OpenAI's error shape and status, never a 5xx ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (dict(messages=CHAT, n=2), "n"),
        (dict(messages=CHAT, max_tokens=100_000), "max_tokens"),
        (dict(messages=CHAT, temperature=7), "temperature"),
        (
            dict(
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            ),
            "messages[0].content[0].type",
        ),
    ],
)
def test_invalid_requests_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=CHAT)
    assert e.value.body["code"] == "model_not_found"


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=server.api, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
    assert e.value.status_code == 401
    r = httpx.get(server.api + "/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_raw_bad_bodies(server):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server.api + "/chat/completions"
    for body in [b'{"messages": [', b"[1, 2]", b"", b"\xff\xfe", b'{"messages": "hi"}', b"null"]:
        r = httpx.post(url, content=body, headers=h)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server.api + "/completions", json={"prompt": [1, 2, 10**9], "max_tokens": 2}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_token"
    r = httpx.post(url, content=b"x" * (2 << 20), headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(server.url + "/v1/nowhere", headers=h)
    assert r.status_code == 404 and "error" in r.json()


def test_health_metrics_openapi(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["ready"] is True
    assert httpx.get(server.url + "/ready").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "aegis_requests_total",
        "aegis_queue_depth",
        "aegis_request_latency_seconds_bucket",
        "aegis_time_to_first_token_seconds_bucket",
        "aegis_completion_tokens_total",
    ):
        assert name in text
    assert metric(server, "aegis_completion_tokens_total", model="tiny") > 0
    assert metric(server, "aegis_requests_total", endpoint="/v1/chat/completions", status="400") >= 6
    schema = httpx.get(server.url + "/schema/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(schema["paths"])


# ---- concurrency ------------------------------------------------------------------------------------------------


def test_sixteen_concurrent_streams_all_complete(server):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"{i}番目の質問です。"}],
            max_tokens=24,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return text, finish, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=server.api, api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(16)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 16
    for text, finish, usage in results:
        assert text and finish == "length" and usage.completion_tokens == 24


def test_dropped_streams_free_their_workers(server, client):
    cancelled_before = metric(server, "aegis_generations_total", model="tiny", reason="cancelled")
    tokens_before = metric(server, "aegis_completion_tokens_total", model="tiny")
    # occupy both workers with long generations, read a little of each, then hang up
    for _ in range(2):
        stream = client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
        )
        for _, _chunk in zip(range(3), stream):
            pass
        stream.close()
    started = time.monotonic()
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 10
    while metric(server, "aegis_generations_total", model="tiny", reason="cancelled") < cancelled_before + 2:
        assert time.monotonic() < deadline, "the dropped streams were not cancelled"
        time.sleep(0.1)
    # both dropped generations stopped far short of their 2000 tokens
    assert metric(server, "aegis_completion_tokens_total", model="tiny") - tokens_before < 2 * 1000 + 4


def test_abandoned_non_stream_request_is_cancelled(server):
    cancelled_before = metric(server, "aegis_generations_total", model="tiny", reason="cancelled")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 2000 tokens are done
        httpx.post(
            server.api + "/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=0.3,
            json={"model": "tiny", "messages": CHAT, "max_tokens": 2000, "ignore_eos": True},
        )
    deadline = time.monotonic() + 10
    while metric(server, "aegis_generations_total", model="tiny", reason="cancelled") < cancelled_before + 1:
        assert time.monotonic() < deadline, "the abandoned request kept its worker"
        time.sleep(0.1)


# ---- limits: a second server with one worker, no waiting room, a short timeout and a small body limit -----------


@pytest.fixture(scope="module")
def limited(served_files, tmp_path_factory):
    gguf, _ = served_files
    log = tmp_path_factory.mktemp("serve") / "limited.log"
    with Server(
        "--model",
        str(gguf),
        "--parallel",
        "1",
        "--threads",
        "1",
        "--ctx-size",
        "2048",
        "--queue-size",
        "0",
        "--timeout",
        "0.25",
        "--max-body",
        "4096",
        log_path=log,
    ) as s:
        yield s


def test_full_queue_is_429_then_timeout_is_504(limited):
    name = Path(httpx.get(limited.url + "/health").json()["models"][0]).name
    c = openai.OpenAI(base_url=limited.api, api_key="unused", max_retries=0, timeout=30)
    stream = c.chat.completions.create(
        model=name, messages=CHAT, max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))  # the only worker is now busy
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=name, messages=CHAT, max_tokens=2)
    assert e.value.status_code == 429 and e.value.response.headers.get("retry-after")
    stream.close()
    deadline = time.monotonic() + 10
    while metric(limited, "aegis_busy_workers", model=name) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.APIStatusError) as e:  # ~2000 tokens take longer than the 0.25 s timeout
        c.chat.completions.create(model=name, messages=CHAT, max_tokens=2000, extra_body={"ignore_eos": True})
    assert e.value.status_code == 504 and e.value.body["type"] == "timeout_error"
    with pytest.raises(openai.APIError, match="timeout"):  # in a stream the error arrives as an event
        for _chunk in c.chat.completions.create(
            model=name, messages=CHAT, max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
        ):
            pass
    r = httpx.post(limited.api + "/chat/completions", json={"messages": [{"role": "user", "content": "あ" * 5000}]})
    assert r.status_code == 413
