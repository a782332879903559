"""The batched engine end to end: concurrent requests share decode steps of one llama.cpp context, each keeps its
own sampling settings and stops, a long prompt is read in chunks while other streams keep moving, and a chat's next
turn reuses the KV cache of the turn before."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import openai
import pytest

from aegis import llamacpp
from serve import prompt
from serve.backends import Sampling
from serve.backends.llamacpp import LlamaCppBackend
from serve.batch import BatchPool
from serve.job import Finish, Job, Scored
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
    seconds = {p: metric(server, "aegis_engine_seconds_total", part=p) for p in ("step", "decode", "decode_cpu")}
    args = dict(model="tiny", messages=USER, max_tokens=48, temperature=1.0, extra_body={"ignore_eos": True})
    replies = asyncio.run(_together(server, [args | {"seed": s} for s in range(4)]))
    assert all(r.usage.completion_tokens == 48 for r in replies)
    steps = metric(server, "aegis_decode_steps_total") - steps
    seqs = metric(server, "aegis_decode_sequences_total") - seqs
    # four requests of 48 tokens one after another would take 4 * 48 steps and more: together, far fewer
    assert seqs / steps > 2.5 and steps < 2 * 48 + 10, (steps, seqs)
    # the engine thread's time: steps hold their llama_decode calls, which take this thread's CPU on a CPU build
    # (its CPU clock and the wall clock may differ by a tick)
    spent = {p: metric(server, "aegis_engine_seconds_total", part=p) - v for p, v in seconds.items()}
    assert spent["step"] >= spent["decode"] > 0 and 0 < spent["decode_cpu"] <= spent["decode"] + 0.02, spent
    assert metric(server, "aegis_workers") == 4


def test_each_request_keeps_its_own_settings(server, client):
    greedy = dict(model="tiny", messages=USER, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    alone = client.chat.completions.create(**greedy).choices[0].message.content
    stop = alone[6:8]
    stopped = greedy | {"stop": [stop]}
    hot = dict(model="tiny", messages=USER, max_tokens=24, temperature=1.5, seed=7)
    replies = asyncio.run(_together(server, [greedy, stopped, hot, hot | {"seed": 8}]))
    assert replies[0].choices[0].message.content == alone  # sampling neighbours do not change a greedy reply
    assert replies[1].choices[0].message.content == alone[: alone.index(stop)]
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

    def greedy(name: str, ids: list[int], max_tokens: int) -> Recorded:
        return Recorded(
            name,
            log,
            prompt=ids,
            sampling=Sampling(temperature=0),
            max_tokens=max_tokens,
            stops=[],
            timeout=120,
            loop=loop,
            ignore_eos=True,
        )

    try:
        short = prompt.chat_ids(backend, USER)
        long = prompt.chat_ids(backend, [{"role": "user", "content": LONG}])
        running = greedy("running", short, 300)
        pool.submit(running)
        while sum(name == "running" for name, _ in log) < 5:
            time.sleep(0.001)
        sent = len(log)
        pool.submit(greedy("long", long, 1))
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


MIXED = [
    Sampling(temperature=0),
    Sampling(temperature=0, presence_penalty=1.5),
    Sampling(temperature=0.9, top_p=0.9, seed=3),
    Sampling(temperature=1.3, top_k=40, seed=5),
    Sampling(temperature=1.0, frequency_penalty=1.0, seed=11),
]


def _until_finished(pool: BatchPool, loop, log: list, n: int) -> None:
    """Wait until n Recorded jobs logged their Finish, then close the pool and the jobs' loop."""
    try:
        while sum(isinstance(item, Finish) for _, item in log) < n:
            time.sleep(0.01)
    finally:
        pool.close()
        loop.close()


def _one_by_one(backend, ids: list[int], settings: list[Sampling], n: int) -> list[list[int]]:
    """n tokens for each request, decoded in the steps the engine takes (every prompt but its last token, then one
    token per slot per step) with each token picked by llama.cpp's own llama_sampler_sample and the slot's chain."""
    batch = backend.new_batch(len(settings))
    try:
        for i, sampling in enumerate(settings):
            batch.start(i, sampling)
        batch.decode([(i, ids[:-1], False) for i in range(len(settings))])
        out, last = [[] for _ in settings], [ids[-1]] * len(settings)
        for _ in range(n):
            batch.decode([(i, [last[i]], True) for i in range(len(settings))])
            for i in range(len(settings)):  # slot i's token is at batch position i
                last[i] = batch.lib.llama_sampler_sample(batch.slots[i].sampler, batch.ctx, i)
                out[i].append(last[i])
        return out
    finally:
        batch.close()


def test_batched_sampling_picks_what_llama_cpp_picks_for_each_request(request):
    """Requests of every kind of sampling decoded together (greedy slots all at once from the logits matrix, the
    others through their chains) get the tokens llama.cpp's own sampler picks for each of them."""
    gguf, _ = serving.served_files(request)
    backend = LlamaCppBackend(gguf, n_threads=1)
    ids = prompt.chat_ids(backend, USER)
    pool = BatchPool(backend, slots=len(MIXED))
    loop, log = asyncio.new_event_loop(), []
    jobs = [
        Recorded(
            i, log, prompt=ids, sampling=s, max_tokens=24, stops=[], timeout=120, loop=loop, ignore_eos=True, logprobs=0
        )
        for i, s in enumerate(MIXED)
    ]
    for job in jobs:  # queued before the engine starts: its first step takes them all
        pool.submit(job)
    pool.start()
    _until_finished(pool, loop, log, len(jobs))
    try:
        expected = _one_by_one(backend, ids, MIXED, 24)
        for i, sampling in enumerate(MIXED):
            together = [item.token for name, item in log if name == i and isinstance(item, Scored)]
            assert together == expected[i], sampling
    finally:
        backend.close()


QUESTIONS = {
    0: "日本の四季について説明してください。",
    1: "おすすめの本を三冊教えてください。",
    5: "東京の天気はどうですか。",
}


def test_slots_decoding_together_take_one_pass_whatever_their_order(request, monkeypatch):
    """Busy slots fed in any order, with idle ones between them, go through the model once per step: llama.cpp runs
    a batch over per-slot caches as one pass per run of consecutive sequence ids, so the batch puts them in order and
    (`offloaded`, true where the model runs on a GPU) gives each idle slot between them a placeholder token.
    The idle slots' cells stay as they were (a full one gives up its last cell for the placeholder) and each busy
    slot gets the logits it gets decoding alone."""
    gguf, _ = serving.served_files(request)
    lib = llamacpp.runtime()
    nodes = []

    @lib.ggml_backend_sched_eval_callback
    def count(tensor, ask, user_data):  # noqa: ARG001 - asked once for each node of each pass
        nodes.append(ask)
        return False

    made = llamacpp.context_params

    def counted(*args, **kwargs):
        cp = made(*args, **kwargs)
        cp.cb_eval = count
        return cp

    monkeypatch.setattr(llamacpp, "context_params", counted)
    backend = LlamaCppBackend(gguf, n_ctx=64, n_threads=1)
    batch = backend.new_batch(6)
    assert not batch.offloaded  # this llama.cpp build runs on the CPU

    def step(order: list[int]) -> tuple[int, dict]:
        """Decode the busy slots' last prompt token in this order: (graph nodes evaluated, logits), then undo it."""
        nodes.clear()
        rows = batch.decode([(i, ids[i][-1:], True) for i in order])
        logits = {i: batch.logits(row) for i, row in rows.items()}
        for i in order:
            batch.drop(i, 1)
        return len(nodes), logits

    try:
        ids = {i: prompt.chat_ids(backend, [{"role": "user", "content": text}]) for i, text in QUESTIONS.items()}
        for i, tokens in ids.items():
            batch.start(i, Sampling(temperature=0))
            batch.decode([(i, tokens[:-1], False)])
        batch.decode([(2, ids[0][:5], False)])
        batch.decode([(4, (ids[0] * 8)[:64], False)])  # slot 4's cells are full; slot 3 holds nothing
        one_pass, alone = step([0])
        alone |= step([1])[1] | step([5])[1]
        assert step([1, 0])[0] < 1.5 * one_pass  # out of order: two passes before the batch sorted them
        assert 1.5 * one_pass < step([5, 0, 1])[0] < 2.5 * one_pass  # slots 0-1, then 5: two runs
        batch.offloaded = True
        n, together = step([5, 0, 1])
        assert n < 1.5 * one_pass, (n, one_pass)  # slots 2, 3 and 4 read a placeholder each: one run
        for i in ids:  # a batch of another size sums in another order: close, not equal; apart from the others'
            assert together[i].argmax() == alone[i].argmax()
            others = min(np.abs(together[i] - alone[j]).max() for j in ids if j != i)
            assert np.abs(together[i] - alone[i]).max() < 0.05 < others
        held = [len(s.cached) for s in batch.slots]
        assert held == [len(ids[0]) - 1, len(ids[1]) - 1, 5, 0, 63, len(ids[5]) - 1], held
        pos_max = [lib.llama_memory_seq_pos_max(batch.mem, i) for i in range(6)]
        assert pos_max == [n - 1 for n in held], pos_max
    finally:
        batch.close()
        backend.close()


RECORD = r"""root ::= "{" ws "\"name\"" ws ":" ws name ws "," ws "\"age\"" ws ":" ws [0-9]{1,3} ws "}"
name ::= "\"" [^"\\\x00-\x1f]{1,12} "\""
ws ::= [ ]?"""


def test_grammar_masks_made_during_the_step_pick_the_same_tokens(request):
    """On a GPU the constrained slots' masks are made while llama_decode's step computes (`offloaded`) and the
    model's choice is checked against them; elsewhere it is checked by the matcher first and only a refused one
    gets a mask. Greedy and sampled constrained slots, beside a free one, pick the same tokens either way."""
    gguf, _ = serving.served_files(request)
    backend = LlamaCppBackend(gguf, n_threads=1)
    ids = prompt.chat_ids(backend, USER)
    settings = [
        Sampling(temperature=0, grammar=RECORD),
        Sampling(temperature=1.0, seed=3, grammar=RECORD),
        Sampling(temperature=0),
        Sampling(temperature=0.8, top_p=0.9, seed=5, grammar=RECORD),
    ]
    made, masks = [], backend.guides.masks
    backend.guides.masks = lambda matchers: made.append(len(matchers)) or masks(matchers)
    runs = []
    try:
        for early in (False, True):
            batch, made[:] = backend.new_batch(len(settings)), []
            batch.offloaded = early
            try:
                for i, sampling in enumerate(settings):
                    batch.start(i, sampling)
                batch.decode([(i, ids[:-1], False) for i in range(len(settings))])
                out, last = [[] for _ in settings], {i: ids[-1] for i in range(len(settings))}
                for _ in range(20):
                    last = batch.sample(batch.decode([(i, [t], True) for i, t in last.items()]))
                    for i, token in last.items():
                        out[i].append(token)
                runs.append((out, dict(batch.refused)))
            finally:
                batch.close()
            if early:  # every step, all three constrained slots at once, before the logits were read
                assert made == [3] * 20, made
            else:  # only for refused choices
                assert len(made) < 20 and max(made) <= 3, made
    finally:
        backend.close()
    assert runs[0] == runs[1]
    assert all(len(tokens) == 20 for tokens in runs[0][0]) and not runs[0][1]


class CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts the wake-ups other threads send it."""

    wakes = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.wakes += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_the_event_loop_is_woken_once_per_step_for_all_requests(request):
    """Eight streams decoding together: their text reaches the loop in one wake-up per decode step, not one per
    request per step (each costs the engine's thread a hand-over of the GIL)."""
    gguf, _ = serving.served_files(request)
    backend = LlamaCppBackend(gguf, n_threads=1)
    pool, loop = BatchPool(backend, slots=8), CountingLoop()
    ids = prompt.chat_ids(backend, USER)

    async def read(job):
        async for _ in job.events():
            pass

    async def read_all():
        await asyncio.gather(*(read(j) for j in jobs))

    jobs = [
        Job(
            prompt=ids,
            sampling=Sampling(temperature=0),
            max_tokens=32,
            stops=[],
            timeout=120,
            loop=loop,
            ignore_eos=True,
        )
        for _ in range(8)
    ]
    for job in jobs:
        pool.submit(job)
    pool.start()
    try:
        loop.run_until_complete(read_all())
    finally:
        pool.close()
        loop.close()
        backend.close()
    assert all(j.finish.completion_tokens == 32 for j in jobs)
    assert loop.wakes <= pool.steps + 1, (loop.wakes, pool.steps)


def test_the_next_turn_of_a_chat_reuses_the_cache(server, client, request, tmp_path_factory):
    first = client.chat.completions.create(model="tiny", messages=USER, max_tokens=16, temperature=0)
    turn2 = USER + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "夏について、もう少し詳しく教えてください。"},
    ]
    second = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=16, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    assert cached >= first.usage.prompt_tokens - 1, (cached, first.usage)
    assert cached < second.usage.prompt_tokens
    # the same turn on a server that reads every prompt whole: the same reply, nothing cached
    with serving.tiny_server(request, tmp_path_factory, "--prefix-cache", "off", name="nocache") as cold:
        fresh = serving.openai_client(cold).chat.completions.create(
            model="nocache", messages=turn2, max_tokens=16, temperature=0
        )
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
    with serving.Server(
        "--model",
        f"tiny={gguf}",
        "--parallel",
        "4",
        "--log-level",
        "info",
        log_path=tmp_path_factory.mktemp("gpu") / "serve.log",
    ) as s:
        log = s.log_path.read_text()
        layers = [w for w in log.split() if "/" in w and w.split("/")[0].isdigit()]
        assert "layers on the GPU" in log and layers and layers[0].split("/")[0] == layers[0].split("/")[1], log
        assert free_before - torch.cuda.mem_get_info()[0] >= 0.9 * gguf.stat().st_size
        replies = asyncio.run(_together(s, [dict(model="tiny", messages=USER, max_tokens=24, temperature=0)] * 4))
        assert all(r.usage.completion_tokens > 0 for r in replies)


def _replies(backend, ids: list[int], requests: list[dict], say_later: bool) -> dict:
    """Each request's (text, scored tokens, finish reason, completion tokens), all decoded together by a BatchPool
    whose tokens' text is made at once, or (say_later) while the next step computes, as on a GPU."""
    pool = BatchPool(backend, slots=len(requests))
    loop, log = asyncio.new_event_loop(), []
    pool.start()
    pool.say_later = say_later
    jobs = [Recorded(i, log, prompt=ids, timeout=120, loop=loop, **r) for i, r in enumerate(requests)]
    for job in jobs:
        pool.submit(job)
    _until_finished(pool, loop, log, len(jobs))
    out = {}
    for i in range(len(jobs)):
        items = [item for name, item in log if name == i]
        finish = items[-1]
        text = "".join(item for item in items if isinstance(item, str))
        scored = [(s.token, round(s.logprob, 4)) for s in items if isinstance(s, Scored)]
        out[i] = (text, scored, finish.reason, finish.completion_tokens)
    return out


def test_text_made_while_the_next_step_computes_is_the_same_reply(request):
    """Where llama_decode only queues the step (a GPU), a token that can end its request only by a stop string is
    fed on at once and its text is made during the next step (say_later). Replies, finish reasons and token counts
    are those of making each token's text at once: a stop string found a step late, max_tokens, the end of the
    turn, log-probabilities, a grammar, sampled and greedy requests side by side."""
    gguf, _ = serving.served_files(request)
    backend = LlamaCppBackend(gguf, n_threads=1)
    try:
        ids = prompt.chat_ids(backend, USER)
        greedy = dict(sampling=Sampling(temperature=0), max_tokens=24, stops=[], ignore_eos=True)
        alone = _replies(backend, ids, [greedy], say_later=False)[0][0]
        stop = alone[8:10]
        requests = [
            greedy,
            greedy | {"stops": [stop]},
            dict(sampling=Sampling(temperature=1.0, seed=3), max_tokens=40, stops=[]),
            dict(sampling=Sampling(temperature=0), max_tokens=12, stops=[], ignore_eos=True, logprobs=2),
            dict(sampling=Sampling(temperature=0, grammar=RECORD), max_tokens=40, stops=[]),
            dict(sampling=Sampling(temperature=0.9, seed=11), max_tokens=30, stops=["の"]),
        ]
        at_once = _replies(backend, ids, requests, say_later=False)
        later = _replies(backend, ids, requests, say_later=True)
    finally:
        backend.close()
    assert later == at_once
    assert at_once[0][2:] == ("length", 24) and at_once[1][:1] == (alone[: alone.index(stop)],)
    assert at_once[1][2] == "stop" and len(at_once[3][1]) == 12
