"""The chat page's pieces that need no browser: stop sequences as typed, the untrained base listed last (models
read from a real HTTP server), the max-tokens bound, and the page policy's hashes of Gradio's inline scripts."""

from __future__ import annotations

import asyncio
import base64
import hashlib

from serve.ui_api import Api, Model, fit, parse_stops
from serve.ui_layout import max_tokens_limit
from serve.ui_theme import HEAD, content_security_policy
from support.echo_api import CONTEXT, EchoApi


def test_stop_sequences_as_typed():
    assert parse_stops("\\x") == ["\\x"]  # an unknown escape stays as typed
    assert parse_stops("。\n終わり") == ["。", "終わり"]  # Japanese is kept as typed
    assert parse_stops("です。\\n\nA\\tB\n\\\\n") == ["です。\n", "A\tB", "\\n"]
    assert parse_stops("a\nb\nc\nd\ne") == ["a", "b", "c", "d"]


def test_the_oldest_exchange_leaves_the_window_first():
    sys_, u1, a1, u2, a2, u3 = (
        {"role": r, "content": str(i)}
        for i, r in enumerate(["system", "user", "assistant", "user", "assistant", "user"])
    )
    assert fit([sys_, u1, a1, u2, a2, u3]) == [sys_, u2, a2, u3]
    assert fit([u1, a1, u3]) == [u3] and fit([sys_, u3]) is None and fit([u3]) is None


def test_base_listed_last_with_its_context():
    """Whatever order the server lists them in, the trained model comes first and the base (--base) last."""
    with EchoApi("base", "souled") as server:
        models = asyncio.run(Api(server.api, None, "base").models())
    assert models == [Model("souled", CONTEXT, False), Model("base", CONTEXT, True)]
    assert max_tokens_limit(CONTEXT) == CONTEXT // 2 and max_tokens_limit(None) == 1024


def test_policy_hashes_the_inline_scripts_only():
    page = '<html><head><script>window.x = 1;</script><script type="module" src="a.js"></script></head></html>'
    digest = base64.b64encode(hashlib.sha256(b"window.x = 1;").digest()).decode()
    policy = content_security_policy(page)
    assert f"script-src 'self' 'sha256-{digest}';" in policy
    assert "unsafe-eval" not in policy and b"page.js" in HEAD
