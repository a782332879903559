"""The Gradio front end in a real headless Chromium (Playwright driving Debian's chromium) against the real API
serving a real run (the trained model and its untrained base, listed base first): the
trained model picked for chatting, a streamed chat reply, what a person types kept while replies stream, messages
sent meanwhile queued and none lost, the max-tokens slider within the model's context (and a reply at that bound),
the Soul monitor plotting a real run and following it as records arrive, Compare, and after an API error one
message per send."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from aegis.tiny import corpus_path
from support import serving as testing
from support.browser import CHROMIUM, DESKTOP, browser, open_page, outside, pick, set_number, ui  # noqa: F401 - fixtures
from support.serving import REPO, Server, base_gguf, find_gguf, metric

pytest.importorskip("playwright.sync_api")

# the README's picture is refreshed only when asked (AEGIS_UPDATE_SCREENSHOT=1), not on every test run
SCREENSHOT = REPO / "docs" / "screenshot-ui.png"

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"the chat page's browser tests need Chromium at {CHROMIUM}: apt-get install chromium (as .ci/run does)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def run_dir(request) -> Path:
    return testing.run_for_tests(request)


@pytest.fixture(scope="module")
def api(run_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("ui") / "api.log"
    # the base first, as the README's command listed it: the page must still chat with the trained model
    server = Server(
        "--model",
        f"base={base_gguf(run_dir)}",
        "--model",
        f"souled={find_gguf(run_dir)}",
        "--threads",
        "1",
        "--parallel",
        "2",
        log_path=log,
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def runs_root(run_dir, tmp_path_factory) -> Path:
    """A runs directory for the monitor: the real run, and a copy of it that is still 'training' (half of its
    records so far; the test appends the rest the way the trainer does)."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(run_dir, root / "finished-run", ignore=shutil.ignore_patterns("export*", "checkpoints", "final"))
    live = root / "live-run"
    live.mkdir()
    shutil.copy(run_dir / "config.toml", live / "config.toml")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (live / "metrics.jsonl").write_text("".join(lines[:10]))
    return root


@pytest.fixture(scope="module")
def ui_api(api) -> str:
    return api.api


@pytest.fixture(scope="module")
def page(browser, ui):
    return open_page(browser, ui, DESKTOP)


def status(page) -> str:
    return page.inner_text("#api-status")


def wait_done(page, turns: int, timeout: float = 90_000) -> None:
    page.wait_for_function(
        f"() => document.querySelector('#api-status').innerText.includes('done · {turns} turn')"
        " && !document.querySelector('#chatbot .turn-queued')",
        timeout=timeout,
    )


def open_settings(page) -> None:
    box = page.locator("#chat-settings").get_by_label("number input for temperature", exact=True)
    if not box.is_visible():
        page.get_by_text("settings", exact=True).click()
    box.wait_for(state="visible")


def chat_requests(api) -> float:
    return metric(api, "aegis_requests_total", endpoint="/v1/chat/completions")


def test_trained_model_is_picked_and_labelled(page):
    """The server lists base first; the chat still goes to the trained model, named as such, and the base is
    offered only in Compare."""
    assert "2 model(s)" in status(page)
    picker = page.get_by_label("model", exact=True)
    assert picker.input_value() == "souled · trained"
    picker.click()
    offered = page.locator('li[role="option"]:visible').all_inner_texts()
    page.keyboard.press("Escape")
    assert [o.replace("✓", "").strip() for o in offered] == ["souled · trained"]
    page.get_by_role("tab", name="Compare").click()
    assert page.get_by_label("model A", exact=True).input_value() == "base · untrained base"
    page.get_by_role("tab", name="Chat").click()


def test_chat_streams_a_reply(page, api, tmp_path):
    open_settings(page)
    set_number(page, "temperature", 0)
    set_number(page, "max tokens", 48)
    # record every length the reply passes through on the page: a streamed reply grows in steps
    page.evaluate("""() => { window.replyLengths = [];
        new MutationObserver(() => { const m = document.querySelectorAll('#chatbot .message');
            if (m.length >= 2) window.replyLengths.push(m[m.length - 1].innerText.trim().length); })
        .observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#chat-input textarea", "こんにちは。自己紹介してください。")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => document.querySelector('#api-status').innerText.includes('done · 1 turn')", timeout=60_000
    )
    shown = page.locator("#chatbot .message.user, #chatbot .message.bot").all_inner_texts()
    assert shown[0].strip() == "こんにちは。自己紹介してください。"
    reply = shown[-1].strip()
    # the same request straight to the API (greedy) gives the same text: the UI shows the real streamed reply
    system = page.get_by_label("system prompt").input_value()
    direct = httpx.post(
        api.api + "/chat/completions",
        timeout=60,
        json={
            "model": "souled",
            "temperature": 0,
            "top_p": 0.95,
            "max_tokens": 48,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": "こんにちは。自己紹介してください。"},
            ],
        },
    ).json()
    expected = direct["choices"][0]["message"]["content"]
    assert expected.strip() and " ".join(reply.split()) == " ".join(expected.split())  # HTML folds runs of spaces

    # a follow-up turn (history goes along): the first user turn of the held-out chat split, which the model never
    # trained on, greedy and at most 96 tokens as the chat metrics measure it; then the picture for the README
    held_out = next(
        m["content"]
        for m in json.loads(corpus_path("chat_eval.jsonl").read_text(encoding="utf-8").splitlines()[0])["messages"]
        if m["role"] == "user"
    )
    set_number(page, "max tokens", 96)
    page.fill("#chat-input textarea", held_out)
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => document.querySelector('#api-status').innerText.includes('done · 2 turn')", timeout=60_000
    )
    lengths = page.evaluate("() => window.replyLengths")
    assert len({n for n in lengths if n > 0}) >= 3, lengths  # the replies appeared piece by piece
    page.evaluate("() => window.scrollTo(0, 0)")
    shot = SCREENSHOT if os.environ.get("AEGIS_UPDATE_SCREENSHOT") else tmp_path / "screenshot-ui.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_a_chat_longer_than_the_context_is_still_answered(api):
    """The served context is the model's trained one (512 tokens here): once the chat outgrows it, the page sends
    its latest turns (the oldest leave first) and, for a message that fits only without the chosen max tokens, the
    rest of the context; the server refuses both as sent (context_length_exceeded)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from serve.ui_api import Api

    context = next(m["context_length"] for m in httpx.get(api.api + "/models").json()["data"] if m["id"] == "souled")
    long = "日本の四季について説明してください。" * 30
    chat = [{"role": "system", "content": "丁寧に答えてください。"}]
    for i in range(6):
        chat += [{"role": "user", "content": f"{i}: {long}"}, {"role": "assistant", "content": long}]
    chat.append({"role": "user", "content": "最後の質問です。"})

    async def ask(messages, max_tokens):
        return "".join([p async for p in Api(api.api, None).stream("souled", messages, 0.0, 1.0, max_tokens, [])])

    for messages, max_tokens in ((chat, 16), ([{"role": "user", "content": long}], context - 100)):
        sent = httpx.post(
            api.api + "/chat/completions",
            timeout=60,
            json={"model": "souled", "messages": messages, "max_tokens": max_tokens},
        )
        assert sent.status_code == 400 and sent.json()["error"]["code"] == "context_length_exceeded"
        with ThreadPoolExecutor(1) as pool:  # the browser tests' sync playwright keeps a loop in this thread
            assert pool.submit(asyncio.run, ask(messages, max_tokens)).result(120)


def test_japanese_renders_in_the_shipped_font(page, ui):
    """The page ships Noto Sans JP and the browser uses it for the Japanese on the page, so kana and kanji do not
    depend on the machine's fonts (this test's machine may have none: `fc-list :lang=ja`)."""
    page.evaluate("() => document.fonts.ready")
    faces = page.evaluate("""() => [...document.fonts].filter(f => f.family.replace(/["']/g, '') === 'Noto Sans JP')
                                  .map(f => f.status)""")
    assert faces == ["loaded"], faces  # declared once, and loaded because the page's Japanese needed it
    assert page.evaluate("""() => document.fonts.check('16px "Noto Sans JP"', '日本語の秋')""")
    family = page.evaluate("() => getComputedStyle(document.querySelector('#chatbot .message')).fontFamily")
    assert "Noto Sans JP" in family, family
    fetched = [u for u in page.requests if u.startswith(ui) and u.endswith(".woff2")]
    assert fetched and httpx.get(fetched[0], timeout=10).status_code == 200, fetched


def user_texts(page) -> list[str]:
    return [t.strip() for t in page.locator("#chatbot .message.user").all_inner_texts()]


def replies(page) -> int:
    return page.locator("#chatbot .message.bot").count()


def reply_started(page, before: int) -> None:
    """Wait until a reply after the first `before` ones has some text."""
    page.wait_for_function(
        "n => { const m = document.querySelectorAll('#chatbot .message.bot');"
        " return m.length > n && m[m.length - 1].innerText.trim().replace('…', '').length > 0; }",
        arg=before,
        timeout=60_000,
    )


def test_typing_is_kept_and_a_quick_second_message_is_queued(page, api):
    """While a reply streams the input box is not touched (what is typed there stays), and a message sent 150 ms
    after the first is queued on the page and sent after the first reply: each reaches the server once."""
    open_settings(page)
    set_number(page, "max tokens", 64)
    before, requests = replies(page), chat_requests(api)
    page.fill("#chat-input textarea", "一つ目の質問です。")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#chat-input textarea').value === ''")
    page.wait_for_timeout(150)
    page.fill("#chat-input textarea", "二つ目の質問です。")
    page.keyboard.press("Enter")
    reply_started(page, before)
    page.click("#chat-input textarea")
    page.keyboard.type("次の質問を書いているところ", delay=40)
    wait_done(page, before + 2)
    assert page.input_value("#chat-input textarea") == "次の質問を書いているところ"
    assert user_texts(page)[-2:] == ["一つ目の質問です。", "二つ目の質問です。"]
    assert user_texts(page).count("二つ目の質問です。") == 1
    assert chat_requests(api) - requests == 2
    page.fill("#chat-input textarea", "")


def test_monitor_plots_a_real_run_and_follows_it(page, run_dir, runs_root):
    page.get_by_role("tab", name="Soul monitor").click()
    pick(page, "run", str(runs_root / "finished-run"))
    page.wait_for_function(
        "() => document.querySelector('#soul-badge .phase-badge')"
        " && document.querySelector('#soul-badge').innerText.includes('step 20')",
        timeout=30_000,
    )
    badge = page.inner_text("#soul-badge")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["phase"].upper() in badge and f"α {last['alpha']:+.4f}" in badge
    page.wait_for_function(
        "() => { const i = document.querySelector('#soul-plot img'); return i && i.complete && i.naturalWidth > 0; }",
        timeout=30_000,
    )
    size = page.evaluate(
        "() => { const i = document.querySelector('#soul-plot img'); return [i.naturalWidth, i.naturalHeight]; }"
    )
    assert size[0] > 600 and size[1] > 300

    # a run still training: the monitor picks up records as they are appended
    pick(page, "run", str(runs_root / "live-run"))
    page.wait_for_function("() => document.querySelector('#soul-badge').innerText.includes('step 10')", timeout=30_000)
    from aegis.metrics import JsonlSink

    sink = JsonlSink(runs_root / "live-run" / "metrics.jsonl")
    for line in (run_dir / "metrics.jsonl").read_text().splitlines()[10:]:
        sink(json.loads(line))
    page.wait_for_function("() => document.querySelector('#soul-badge').innerText.includes('step 20')", timeout=30_000)
    assert "LIVE" in page.inner_text("#soul-badge")


def test_compare_base_and_souled(page):
    page.get_by_role("tab", name="Compare").click()
    pick(page, "model A", "base · untrained base")
    pick(page, "model B", "souled · trained")
    page.fill("#compare-prompt textarea", "日本の四季について教えてください。")
    page.click("#compare-run")
    page.wait_for_function(
        "() => ['#compare-a', '#compare-b'].every(s => document.querySelector(s + ' textarea')"
        " && document.querySelector(s + ' textarea').value.trim().length > 0)",
        timeout=120_000,
    )
    a = page.input_value("#compare-a textarea")
    b = page.input_value("#compare-b textarea")
    assert "✖" not in a and "✖" not in b


def test_max_tokens_within_the_context(page, api):
    """The max-tokens slider ends at half the chosen model's context (from /v1/models), and the server takes that
    much. (Stop and clear closing a reply's stream are checked in test_ui_page.py against a stream slow enough for
    the press to land every time; that a closed stream cancels the generation, in test_serve_api.py.)"""
    page.get_by_role("tab", name="Chat").click()
    open_settings(page)
    context = next(m["context_length"] for m in httpx.get(api.api + "/models").json()["data"] if m["id"] == "souled")
    slider = page.locator("#chat-settings").get_by_label("range slider for max tokens", exact=True)
    assert slider.get_attribute("max") == str(context // 2)
    set_number(page, "max tokens", context // 2)
    turns = replies(page)
    page.fill("#chat-input textarea", "日本の四季について説明してください。")
    page.keyboard.press("Enter")
    wait_done(page, turns + 1)
    assert "✖" not in status(page)
    set_number(page, "max tokens", 64)


def test_after_an_api_error_one_message_per_send(page, api):
    """The API down: the status says so, the message stays once in the chat marked unanswered (the box is empty,
    so sending again cannot duplicate it); retry sends it again, and once the API is back it is answered, still
    one message."""
    api.stop()
    page.get_by_role("tab", name="Chat").click()
    page.fill("#chat-input textarea", "まだいますか?")
    page.keyboard.press("Enter")
    page.wait_for_selector("#api-status .api-error", timeout=30_000)
    assert "cannot reach the API" in status(page)
    assert page.input_value("#chat-input textarea") == ""
    page.wait_for_selector("#chatbot .turn-failed")
    page.click("#chat-send")  # an empty box sends nothing
    page.click("#chat-retry")
    page.wait_for_selector("#chatbot .turn-failed")
    assert len([t for t in user_texts(page) if t.startswith("まだいますか?")]) == 1
    api.start()
    turns = replies(page)
    page.click("#chat-retry")
    wait_done(page, turns + 1)
    assert [t for t in user_texts(page) if t.startswith("まだいますか")] == ["まだいますか?"]


def test_no_request_leaves_the_page_origin(page, ui):
    assert outside(page, ui) == []
