"""Prometheus metrics: requests by endpoint and status, tokens in and out (cached prompt tokens too), queue depth, busy
slots, the batched engine's decode steps and the sequences they carried, the tokens prompt lookup drafted and those
decoding kept, latency and time to first token, open connections and those the server closed itself. Each app has
its own registry, so several servers in one process (tests) never share counts.

Requests are counted by an ASGI middleware that sees the status line of every response (401 and 413 included)
and times the whole exchange (a stream ends when its last chunk is sent). Paths outside the API are counted as
"other" so random URLs cannot blow up the label set."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class BatchCounts:
    """The batched engines' own counters, read when scraped: sequences / steps is the mean batch."""

    def __init__(self):
        self.pools = {}

    def collect(self):
        steps = CounterMetricFamily("aegis_decode_steps", "llama_decode calls of the batched engine", labels=["model"])
        seqs = CounterMetricFamily(
            "aegis_decode_sequences",
            "sequences those calls carried (a prompt chunk or one generated token each)",
            labels=["model"],
        )
        drafted = CounterMetricFamily(
            "aegis_draft_tokens", "tokens drafted (--speculate: by prompt lookup or --draft-model)", labels=["model"]
        )
        accepted = CounterMetricFamily(
            "aegis_draft_accepted_tokens",
            "drafted tokens greedy decoding agreed with, each a step saved (accepted / drafted: the acceptance rate)",
            labels=["model"],
        )
        rate = GaugeMetricFamily(
            "aegis_draft_acceptance_rate",
            "accepted / drafted tokens since the start (0 before any draft)",
            labels=["model"],
        )
        seconds = CounterMetricFamily(
            "aegis_engine_seconds",
            "seconds of the batched engine's thread: in decode steps (part=step); in llama_decode with its batch and "
            "logits (part=decode); the thread's CPU time in the latter (part=decode_cpu)",
            labels=["model", "part"],
        )
        for name, pool in self.pools.items():
            for part, value in (("step", pool.step_s), ("decode", pool.decode_s), ("decode_cpu", pool.decode_cpu_s)):
                seconds.add_metric([name, part], value)
            steps.add_metric([name], pool.steps)
            seqs.add_metric([name], pool.sequences)
            drafted.add_metric([name], pool.drafted)
            accepted.add_metric([name], pool.accepted)
            rate.add_metric([name], pool.accepted / pool.drafted if pool.drafted else 0.0)
        yield from (steps, seqs, drafted, accepted, rate, seconds)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "aegis_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "aegis_request_latency_seconds",
            "time from request to the last byte sent",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "aegis_time_to_first_token_seconds",
            "time from request to the first generated text",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("aegis_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("aegis_completion_tokens", "tokens generated", ["model"], registry=r)
        self.queue_depth = Gauge("aegis_queue_depth", "requests waiting for a model worker", ["model"], registry=r)
        self.cached_tokens = Counter(
            "aegis_cached_prompt_tokens", "prompt tokens found in a slot's KV cache", ["model"], registry=r
        )
        self.busy_workers = Gauge(
            "aegis_busy_workers",
            "requests being decoded (llama.cpp slots or transformers workers in use)",
            ["model"],
            registry=r,
        )
        self.workers = Gauge("aegis_workers", "requests a model serves at once (--parallel)", ["model"], registry=r)
        self.finished = Counter("aegis_generations", "generations by finish reason", ["model", "reason"], registry=r)
        # kept by the HTTP protocol (serve/server.py), below the app
        self.open_connections = Gauge("aegis_open_connections", "HTTP connections open now", registry=r)
        self.dropped = Counter(
            "aegis_connections_dropped",
            "connections the server closed on its own: "
            "header_timeout (no complete request headers in time), body_timeout (a body the app "
            "did not read arrived too slowly), over_limit (--max-connections were open)",
            ["reason"],
            registry=r,
        )

        self.batches = BatchCounts()
        r.register(self.batches)

    def watch_pool(self, model: str, pool) -> None:
        """Queue depth, busy slots and decode steps are read from the pool when scraped, never stale."""
        self.queue_depth.labels(model).set_function(lambda: pool.waiting)
        self.busy_workers.labels(model).set_function(lambda: pool.busy)
        self.workers.labels(model).set(pool.workers)
        if hasattr(pool, "steps"):
            self.batches.pools[model] = pool

    def record_generation(self, model: str, finish, first_token_s: float | None) -> None:
        self.prompt_tokens.labels(model).inc(finish.prompt_tokens)
        self.cached_tokens.labels(model).inc(finish.cached_tokens)
        self.completion_tokens.labels(model).inc(finish.completion_tokens)
        self.finished.labels(model, finish.reason).inc()
        if first_token_s is not None:
            self.ttft.labels(model).observe(first_token_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def middleware(self, app):
        """ASGI middleware factory (Litestar's `middleware=[...]` calls it with the next app)."""
        metrics = self

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            start, status = time.perf_counter(), [500]

            async def send_and_watch(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_and_watch)
            finally:
                metrics.requests.labels(endpoint, str(status[0])).inc()
                metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

        return counted
