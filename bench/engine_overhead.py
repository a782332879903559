"""The batched engine's own cost per decode step: how long one step of `serve.batch.BatchPool` takes beside the
llama_decode inside it (building the batch, sampling, detokenizing, stops, bookkeeping, handing text to the event
loop), with every slot generating.

    python bench/engine_overhead.py [--gguf FILE] [--slots 1,16,64] [--tokens 128] [--threads N]
                                    [--gpu-layers -1] [--sampled] [--profile] [--out FILE.json]

For each slot count the engine is started on the GGUF with that many slots, as many greedy requests (--sampled:
temperature 0.8, top_p 0.95, a seed each) of --tokens tokens each (end-of-turn ignored) are submitted at once and an
asyncio loop reads their text as the API does. llama_decode is timed where the engine calls it, up to the end of the
llama_get_logits after it (on a GPU llama_decode only queues the step, which that call waits for); a step is the time
from one llama_decode's start to the next one's, taken only over steps where every slot decodes one token (no
prompt being read). Reported per slot count: the median step, the median llama_decode, their difference (the
engine's overhead per step) and its share, and tokens/s; then the mean time per step (every step) in llama_decode,
in filling the batch and reading the logits, in sampling, in turning tokens into text with stops and bookkeeping,
and in handing the step's text to the event loop. --profile adds the scheduler thread's top functions by own
time. Without --gguf, the GGUF of a short training run of the embedded model is made (and cached) first.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import short_run_gguf  # noqa: E402
from serve.backends import Sampling  # noqa: E402
from serve.backends.llamacpp import LlamaCppBackend  # noqa: E402
from serve.batch import BatchPool  # noqa: E402
from serve.job import Job  # noqa: E402

PROMPT = "日本の四季について説明してください。"


class TimedRuntime:
    """llama_cpp's functions as the batch calls them, with each llama_decode's start, end and batch size kept."""

    def __init__(self, lib):
        self._lib = lib
        self.calls: list[tuple[float, float, int]] = []

    def __getattr__(self, name):
        value = getattr(self._lib, name)
        setattr(self, name, value)  # looked up once: the proxy must not add to what it measures
        return value

    def llama_decode(self, ctx, batch):
        start = time.perf_counter()
        rc = self._lib.llama_decode(ctx, batch)
        self.calls.append((start, time.perf_counter(), batch.n_tokens))
        return rc

    def llama_get_logits(self, ctx):
        """Counted with the llama_decode before it: on a GPU llama_decode only queues the step, and this waits."""
        ptr = self._lib.llama_get_logits(ctx)
        if self.calls:
            start, _, n = self.calls[-1]
            self.calls[-1] = (start, time.perf_counter(), n)
        return ptr


def _timed(obj, name: str, totals: dict) -> None:
    """obj.name, with the seconds spent in it added to totals[name]."""
    totals[name] = 0.0
    fn = getattr(obj, name, None)
    if fn is None:  # an engine without it (the wake-up was part of each token's handling before it had its own)
        return

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(obj, name, timed)


async def _read(job: Job) -> int:
    n = 0
    async for pieces in job.events():
        n += len(pieces)
    return n


def measure(backend, slots: int, tokens: int, sampled: bool, profile: bool) -> dict:
    pool = BatchPool(backend, slots=slots, max_queue=0)
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        run = pool._run

        def profiled():
            prof.enable()
            try:
                run()
            finally:
                prof.disable()

        pool._run = profiled
    pool.start()
    timed = pool._batch.lib = TimedRuntime(pool._batch.lib)
    totals: dict[str, float] = {}
    for obj, name in ((pool, "_step"), (pool, "_wake"), (pool._batch, "decode"), (pool._batch, "sample")):
        _timed(obj, name, totals)
    prompt = backend.tokenize(PROMPT)

    async def main():
        loop = asyncio.get_running_loop()
        jobs = []
        for i in range(slots):
            s = Sampling(temperature=0.8, top_p=0.95, seed=i) if sampled else Sampling(temperature=0.0)
            jobs.append(
                Job(prompt=prompt, sampling=s, max_tokens=tokens, stops=[], timeout=600, loop=loop, ignore_eos=True)
            )
        start = time.perf_counter()
        for job in jobs:
            pool.submit(job)
        await asyncio.gather(*(_read(j) for j in jobs))
        return time.perf_counter() - start, sum(j.finish.completion_tokens for j in jobs)

    try:
        wall, generated = asyncio.run(main())
    finally:
        pool.close()
    calls = timed.calls
    steady = [
        (calls[i + 1][0] - calls[i][0], calls[i][1] - calls[i][0])
        for i in range(len(calls) - 1)
        if calls[i][2] == slots and calls[i + 1][2] == slots
    ]
    step = statistics.median(s for s, _ in steady) * 1e3
    decode = statistics.median(d for _, d in steady) * 1e3
    over = statistics.median(s - d for s, d in steady) * 1e3
    out = dict(
        slots=slots,
        steps=len(calls),
        steady_steps=len(steady),
        step_ms=round(step, 3),
        llama_decode_ms=round(decode, 3),
        overhead_ms=round(over, 3),
        overhead_share=round(over / step, 3),
        overhead_us_per_slot=round(over * 1e3 / slots, 1),
        tokens_per_s=round(generated / wall, 1),
    )
    # where a step's time goes, as means over every step (prompt steps too)
    n, llama = len(calls), sum(end - start for start, end, _ in calls)
    split = dict(
        llama_decode=llama,
        batch=totals["decode"] - llama,
        sampling=totals["sample"],
        text_and_bookkeeping=totals["_step"] - totals["decode"] - totals["sample"],
        wake=totals["_wake"],
    )
    out["mean_ms"] = {k: round(v / n * 1e3, 3) for k, v in split.items()}
    if prof is not None:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
        out["profile"] = text.getvalue()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--slots", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gpu-layers", type=int, default=-1)
    ap.add_argument("--ctx", type=int, default=512, help="positions per slot")
    ap.add_argument("--sampled", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    gguf = args.gguf or short_run_gguf()
    backend = LlamaCppBackend(gguf, n_ctx=args.ctx, n_threads=args.threads, gpu_layers=args.gpu_layers)
    rows = []
    try:
        for slots in (int(s) for s in args.slots.split(",")):
            row = measure(backend, slots, args.tokens, args.sampled, args.profile)
            rows.append(row)
            print(
                f"{slots:3d} slots: step {row['step_ms']:.3f} ms, llama_decode {row['llama_decode_ms']:.3f} ms, "
                f"overhead {row['overhead_ms']:.3f} ms ({row['overhead_share']:.0%}, "
                f"{row['overhead_us_per_slot']:.1f} us/slot), {row['tokens_per_s']:.0f} tokens/s",
                flush=True,
            )
            print("     mean per step (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in row["mean_ms"].items()))
            if args.profile:
                print(row["profile"])
    finally:
        backend.close()
    if args.out:
        meta = dict(
            gguf=str(gguf),
            machine=platform.processor() or platform.machine(),
            cpus=os.cpu_count(),
            tokens=args.tokens,
            sampled=args.sampled,
            date=time.strftime("%Y-%m-%d"),
        )
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
