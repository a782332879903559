"""--cache-type: the KV cache in q8_0 serves, says so at start-up with llama.cpp's own account of its memory (about
half of f16's), and its greedy replies are compared with f16's: recorded, not required to be equal (8-bit keys and
values move the logits a little, and a near tie can then go the other way)."""

from __future__ import annotations

import contextlib
import re

import pytest

from support import serving

PROMPTS = ["日本の四季について説明してください。", "東京はどんな街ですか。", "好きな食べ物を教えてください。"]
KV_LINE = re.compile(r"KV cache (\w+), ([\d.]+) MiB for (\d+) slots of (\d+) positions")


@pytest.fixture(scope="module")
def servers(request, tmp_path_factory):
    with contextlib.ExitStack() as stack:
        yield {
            kind: stack.enter_context(
                serving.tiny_server(request, tmp_path_factory, "--cache-type", kind, name=f"tiny-{kind}")
            )
            for kind in ("f16", "q8_0")
        }


def _kv(server) -> tuple[str, float, int, int]:
    found = KV_LINE.search(server.log_path.read_text())
    assert found, server.log()
    kind, mib, slots, positions = found.groups()
    return kind, float(mib), int(slots), int(positions)


def _greedy(server, text: str) -> str:
    client = serving.openai_client(server)
    reply = client.chat.completions.create(
        model=server.args[server.args.index("--model") + 1].split("=")[0],
        messages=[{"role": "user", "content": text}],
        max_tokens=32,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return reply.choices[0].message.content


def test_q8_0_serves_and_its_cache_takes_about_half_the_memory(servers):
    f16, q8 = _kv(servers["f16"]), _kv(servers["q8_0"])
    assert f16[0] == "f16" and q8[0] == "q8_0"
    assert f16[2:] == q8[2:]  # the same slots and positions ...
    assert q8[1] < 0.6 * f16[1], (f16, q8)  # ... in 34 bytes per 32 values instead of 64
    assert _greedy(servers["q8_0"], PROMPTS[0])


def test_greedy_replies_at_q8_0_against_f16_are_recorded(servers, record_property):
    shared = []
    for text in PROMPTS:
        a, b = _greedy(servers["f16"], text), _greedy(servers["q8_0"], text)
        assert a and b
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shared.append(f"{same}/{len(a)}")
    record_property("q8_0_vs_f16_shared_prefix_chars", ", ".join(shared))
    print(f"greedy replies, characters q8_0 shares with f16 before they part: {', '.join(shared)}")
