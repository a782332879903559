"""The batched engine end to end: concurrent requests share decode steps of one llama.cpp context, each keeps its
own sampling settings and stops, a long prompt is read in chunks while other streams keep moving, and a chat's next
turn reuses the KV cache of the turn before."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from serve import prompt
from serve.backends import Sampling
from serve.backends.llamacpp import LlamaCppBackend
from serve.batch import BatchPool
from serve.job import Job
from support import serving
from support.serving import metric

USER = [{"role": "user", "content": "日本の四季について説明してください。"}]


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    # a small batch, so that a long prompt takes many steps to read
    with serving.tiny_server(request, tmp_path_factory, "--parallel", "4", "--batch-size", "16") as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return serving.openai_client(server)


async def _together(server, requests: list[dict]) -> list:
    async with openai.AsyncOpenAI(base_url=server.api, api_key="none", max_retries=0, timeout=120) as c:
        return await asyncio.gather(*(c.chat.completions.create(**r) for r in requests))


def test_concurrent_requests_share_decode_steps(server):
    steps, seqs = metric(server, "aegis_decode_steps_total"), metric(server, "aegis_decode_sequences_total")
    args = dict(model="tiny", messages=USER, max_tokens=48, temperature=1.0, extra_body={"ignore_eos": True})
    replies = asyncio.run(_together(server, [args | {"seed": s} for s in range(4)]))
    assert all(r.usage.completion_tokens == 48 for r in replies)
    steps = metric(server, "aegis_decode_steps_total") - steps
    seqs = metric(server, "aegis_decode_sequences_total") - seqs
    # four requests of 48 tokens one after another would take 4 * 48 steps and more: together, far fewer
    assert seqs / steps > 2.5 and steps < 2 * 48 + 10, (steps, seqs)
    assert metric(server, "aegis_workers") == 4


def test_each_request_keeps_its_own_settings(server, client):
    greedy = dict(model="tiny", messages=USER, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    alone = client.chat.completions.create(**greedy).choices[0].message.content
    stop = alone[6:8]
    stopped = greedy | {"stop": [stop]}
    hot = dict(model="tiny", messages=USER, max_tokens=24, temperature=1.5, seed=7)
    replies = asyncio.run(_together(server, [greedy, stopped, hot, hot | {"seed": 8}]))
    assert replies[0].choices[0].message.content == alone  # sampling neighbours do not change a greedy reply
    assert replies[1].choices[0].message.content == alone[:alone.index(stop)]
    assert replies[1].choices[0].finish_reason == "stop" and replies[0].choices[0].finish_reason == "length"
    assert replies[2].choices[0].message.content != replies[3].choices[0].message.content != alone


LONG = "東京は日本の首都で、多くの人が暮らしています。" * 32


class Recorded(Job):
    """A job whose emitted items go into one shared log, in the order the engine emits them."""

    def __init__(self, name: str, log: list, **kwargs):
        super().__init__(**kwargs)
        self.name, self.log = name, log

    def emit(self, item) -> None:
        self.log.append((self.name, item))
        super().emit(item)


def _steps_while_reading(gguf, batch_size: int) -> tuple[int, int]:
    """(tokens a running request got between a long prompt's arrival and that prompt's first token, the long
    prompt's length), driving the engine in-process so the order of events is exact."""
    backend = LlamaCppBackend(gguf, n_threads=1, n_batch=batch_size)
    pool = BatchPool(backend, slots=2)
    pool.start()
    loop, log = asyncio.new_event_loop(), []
    greedy = Sampling(temperature=0)
    try:
        short = prompt.chat_ids(backend, USER)
        long = prompt.chat_ids(backend, [{"role": "user", "content": LONG}])
        running = Recorded("running", log, prompt=short, sampling=greedy, max_tokens=300, stops=[], timeout=120,
                           loop=loop, ignore_eos=True)
        pool.submit(running)
        while sum(name == "running" for name, _ in log) < 5:
            time.sleep(0.001)
        sent = len(log)
        pool.submit(Recorded("long", log, prompt=long, sampling=greedy, max_tokens=1, stops=[], timeout=120,
                             loop=loop, ignore_eos=True))
        while not any(name == "long" for name, _ in log):
            time.sleep(0.001)
        running.cancel()
        first = next(i for i, (name, _) in enumerate(log) if name == "long")
        return sum(name == "running" for name, _ in log[sent:first]), len(long)
    finally:
        pool.close()
        backend.close()
        loop.close()


def test_a_long_prompt_is_read_in_chunks_while_a_request_runs(request):
    """With a batch of 16 tokens a prompt of some 400 takes 25 steps or more to read, and a request already
    running gets a token on each of them; with a batch that takes the prompt whole, it waits instead."""
    gguf, _ = serving.served_files(request)
    moved, length = _steps_while_reading(gguf, 16)
    assert length > 300
    assert moved >= length // 15 - 2, (moved, length)
    moved, _ = _steps_while_reading(gguf, 512)
    assert moved <= 3, moved


def test_the_next_turn_of_a_chat_reuses_the_cache(server, client, request, tmp_path_factory):
    first = client.chat.completions.create(model="tiny", messages=USER, max_tokens=16, temperature=0)
    turn2 = USER + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "夏について、もう少し詳しく教えてください。"}]
    second = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=16, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    assert cached >= first.usage.prompt_tokens - 1, (cached, first.usage)
    assert cached < second.usage.prompt_tokens
    # the same turn on a server that reads every prompt whole: the same reply, nothing cached
    with serving.tiny_server(request, tmp_path_factory, "--prefix-cache", "off", name="nocache") as cold:
        fresh = serving.openai_client(cold).chat.completions.create(model="nocache", messages=turn2, max_tokens=16,
                                                                   temperature=0)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.choices[0].message.content == second.choices[0].message.content


def test_the_log_says_where_the_layers_went(server):
    """Start-up names the placement: on a build without a GPU backend (CI's) it says so plainly."""
    from aegis import llamacpp
    log = server.log_path.read_text()
    if llamacpp.runtime().llama_supports_gpu_offload():
        assert "layers on the GPU" in log, log[-2000:]
    else:
        assert "CPU only (this llama.cpp build has no GPU backend)" in log, log[-2000:]


@pytest.mark.gpu
def test_serve_puts_every_layer_on_the_gpu_and_decodes_there(tiny_path, tmp_path_factory):
    """With llama-cpp-python built with CUDA, `serve` (default --n-gpu-layers -1) puts all layers on the GPU: its log
    says so, the GPU's free memory drops by at least the weights', and concurrent requests decode. (The embedded
    model exported directly: no training, so no bitsandbytes, is needed where this runs.)"""
    import torch

    from aegis import llamacpp
    from export.pipeline import export_gguf
    assert llamacpp.runtime().llama_supports_gpu_offload(), "this llama-cpp-python has no GPU backend"
    gguf = tmp_path_factory.mktemp("gpu") / "tiny-q8_0.gguf"
    export_gguf(tiny_path, gguf, "q8_0", progress=False, check_parity=False, log=lambda *_: None)
    free_before, _ = torch.cuda.mem_get_info()
    with serving.Server("--model", f"tiny={gguf}", "--parallel", "4", "--log-level", "info",
                        log_path=tmp_path_factory.mktemp("gpu") / "serve.log") as s:
        log = s.log_path.read_text()
        layers = [w for w in log.split() if "/" in w and w.split("/")[0].isdigit()]
        assert "layers on the GPU" in log and layers and layers[0].split("/")[0] == layers[0].split("/")[1], log
        assert free_before - torch.cuda.mem_get_info()[0] >= 0.9 * gguf.stat().st_size
        replies = asyncio.run(_together(s, [dict(model="tiny", messages=USER, max_tokens=24, temperature=0)] * 4))
        assert all(r.usage.completion_tokens > 0 for r in replies)
