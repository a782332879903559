"""The chat page itself in a real headless Chromium, against an API whose model repeats the message (so a reply's
text is known, and its stream is as slow as a test asks): markup in messages and replies shows as text and never
reaches the network, stop and clear close the reply's stream mid-way and the chat goes on, a message sent again is
answered in its place, the page's Content-Security-Policy, the Japanese font at first paint, axe-core at a desktop
and a phone viewport, and a phone layout that fits."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from support.browser import (
    CHROMIUM,
    DESKTOP,
    PHONE,
    PLACEHOLDER,
    TOFU,
    axe_violations,
    browser,  # noqa: F401 - a fixture
    open_page,
    outside,
    tofu,
    ui,  # noqa: F401 - a fixture
)
from support.echo_api import EchoApi

pytest.importorskip("playwright.sync_api")

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"the chat page's browser tests need Chromium at {CHROMIUM}: apt-get install chromium (as .ci/run does)",
        allow_module_level=True,
    )

# markup of every kind that could make a browser fetch something or create an element, if a message were rendered
PAYLOADS = [
    "![x](http://203.0.113.1/beacon.png)",
    "<img src=x>",
    '<img src="http://203.0.113.2/i.png" onerror="fetch(\'http://203.0.113.3/\')">',
    "[click](javascript:alert(1))",
    '<a href="javascript:alert(1)">link</a>',
    "<svg onload=\"fetch('http://203.0.113.4/')\"><circle r=5></circle></svg>",
    '<iframe src="http://203.0.113.5/"></iframe>',
    '<div style="background:url(http://203.0.113.6/bg.png)">css</div>',
    "<style>body{background:url(http://203.0.113.7/s.png)}</style>",
    "<http://203.0.113.8/autolink>",
    "![d](data:image/svg+xml;base64,PHN2ZyB4bWxucz0iaHR0cDovL3d3dy53My5vcmcvMjAwMC9zdmciLz4=)",
    '<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">',
    '<object data="http://203.0.113.10/o.swf"></object>',
    '<video src="http://203.0.113.11/v.mp4" autoplay></video>',
    '<link rel="stylesheet" href="http://203.0.113.12/x.css">',
    '<script src="http://203.0.113.13/x.js"></script>',
    "[![img](http://203.0.113.14/a.png)](http://203.0.113.15/)",
    '<form action="http://203.0.113.16/"><button>go</button></form>',
    "<math><mtext><img src=http://203.0.113.17/m.png></mtext></math>",
    "![ref][r]\n\n[r]: http://203.0.113.19/r.png",
]
ELEMENTS = "img, svg, iframe, object, embed, video, audio, source, link, style, script, form, button, a, math, input"


@pytest.fixture(scope="module")
def echo():
    with EchoApi("echo_q8_0") as api:  # an underscore in the name, as in quickstart-q8_0
        yield api


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """A run directory with a few metrics records, as training writes them, for the monitor on a phone."""
    root = tmp_path_factory.mktemp("runs")
    run = root / "run"
    run.mkdir()
    records = [
        {
            "step": s,
            "loss": 3.0 - s / 10,
            "alpha": -5 + s / 3,
            "gate": s / 25,
            "ortho_error": 1e-7,
            "tokens_per_s": 900.0,
            "phase": "chaos" if s < 5 else "transition",
        }
        for s in range(1, 21)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def ui_api(echo) -> str:
    return echo.api


def test_japanese_font_at_first_paint(browser, ui):
    """The placeholder is Japanese: the shipped font is loaded with the page, before the input is first drawn, not
    when a Japanese message first appears (this machine may have no Japanese font: fc-list :lang=ja). Checked at
    the moment the input joins the page, and again once the page has settled."""
    page = browser.new_page(viewport=DESKTOP)
    page.add_init_script(f"""const tofuOf = {TOFU};
        new MutationObserver((_, seen) => {{
            const input = document.querySelector('#chat-input textarea');
            if (!input || !input.placeholder) return;
            seen.disconnect();
            window.atFirstPaint = {{faces: [...document.fonts].filter(f => f.family.includes('Noto Sans JP'))
                                                               .map(f => f.status),
                                    tofu: tofuOf(['#chat-input textarea', input.placeholder])}};
        }}).observe(document, {{subtree: true, childList: true, attributes: true}});""")
    page.goto(ui, wait_until="load")
    page.wait_for_function("() => window.atFirstPaint", timeout=60_000)
    assert page.evaluate("() => window.atFirstPaint") == {"faces": ["loaded"], "tofu": []}
    assert page.get_attribute("#chat-input textarea", "placeholder") == PLACEHOLDER
    page.evaluate("() => document.fonts.ready")
    assert page.evaluate(f"() => document.fonts.check('16px \"Noto Sans JP\"', {json.dumps(PLACEHOLDER)})")
    assert tofu(page, "#chat-input textarea", PLACEHOLDER + "日本語の秋") == []
    page.close()


def test_messages_and_replies_are_text(browser, ui, echo):
    """Twenty kinds of markup sent as messages (and repeated by the model as replies) show as the text typed: no
    element is made from them, and no request leaves the page's origin."""
    page = open_page(browser, ui)
    sent = len(echo.requests)
    for payload in PAYLOADS:  # sent one right after the other: the page queues them while replies stream
        page.fill("#chat-input textarea", payload)
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelector('#chat-input textarea').value === ''")
    page.wait_for_function(
        "n => document.querySelectorAll("
        "'#chatbot .message.user, #chatbot .message.bot').length === n"
        " && !document.querySelector('#chatbot .turn-queued')"
        " && document.querySelector('#api-status').innerText.includes('done')",
        arg=2 * len(PAYLOADS),
        timeout=60_000,
    )
    texts = page.locator("#chatbot .message.user, #chatbot .message.bot").all_inner_texts()
    norm = lambda s: " ".join(s.split())  # noqa: E731 - the page shows line breaks; innerText may fold spaces
    assert [norm(t) for t in texts] == [norm(p) for p in PAYLOADS for _ in (0, 1)]
    assert [r["messages"][-1]["content"] for r in echo.requests[sent:]] == PAYLOADS  # each sent once, in order
    made = page.evaluate(
        f"() => [...document.querySelectorAll('#chatbot .message.user, #chatbot .message.bot')]"
        f".flatMap(m => [...m.querySelectorAll({json.dumps(ELEMENTS)})].map(e => e.outerHTML))"
    )
    assert made == []
    assert not page.locator("#chatbot a[href^='javascript']").count()
    page.wait_for_timeout(500)  # anything a message could have started loading has had time to ask
    assert outside(page, ui) == []
    assert page.evaluate("() => window.cspViolations") == []
    page.close()


MESSAGES = "#chatbot .message.user, #chatbot .message.bot"


def chat_log(page) -> list[str]:
    """The chat as drawn: "user: TEXT" / "bot: TEXT" in order, spaces folded."""
    return page.evaluate(f"""() => [...document.querySelectorAll({json.dumps(MESSAGES)})].map(m =>
        (m.classList.contains('user') ? 'user: ' : 'bot: ') + m.innerText.split(/\\s+/).join(' ').trim())""")


def send(page, text: str) -> None:
    page.fill("#chat-input textarea", text)
    page.press("#chat-input textarea", "Enter")


def wait_status(page, words: str, timeout: float = 30_000) -> None:
    page.wait_for_function(
        "w => document.querySelector('#api-status').innerText.includes(w)", arg=words, timeout=timeout
    )


def wait_closed(echo, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while echo.closed_early < count:
        assert time.monotonic() < deadline, f"the page closed {echo.closed_early} streams early, not {count}"
        time.sleep(0.05)


def wait_bot_text(page, text: str) -> None:
    """Until the last reply on the page holds text."""
    page.wait_for_function(
        "t => { const m = document.querySelectorAll('#chatbot .message.bot');"
        " return m.length && m[m.length - 1].innerText.includes(t); }",
        arg=text,
    )


def test_stop_and_clear_close_the_stream_and_the_chat_goes_on(browser, ui, echo):
    """A reply written in 8 pieces 1 s apart, whose stream does not end until the test lets it (so the press lands
    however slow the machine): stop pressed after its first piece closes its stream (the API sees the client leave
    before the end), the part written stays, marked stopped, and grows no more; the next message is answered and
    drawn. Clear mid-reply closes the stream too, the log stays empty, and the next message starts a new chat."""
    page = open_page(browser, ui)
    long = "春は桜、夏は花火、秋は紅葉、冬は雪。" * 2
    hold = threading.Event()
    try:
        echo.slow(1.0, hold, pieces=8)
        closed = echo.closed_early
        send(page, long)
        wait_bot_text(page, long[:4])
        page.click("#chat-stop")
        page.wait_for_selector("#chatbot .turn-stopped", timeout=10_000)
        wait_closed(echo, closed + 1)
        stopped = chat_log(page)[-1]
        assert stopped.startswith("bot: " + long[:4]) and long not in stopped and "⏹ stopped" in stopped, stopped
        wait_status(page, "echo_q8_0: stopped")
        page.wait_for_timeout(2500)  # two more pieces would have come by now
        assert chat_log(page)[-1] == stopped
        echo.slow(0.02)
        send(page, "止めた後の質問")
        wait_status(page, "done · 2 turn")
        assert chat_log(page)[-2:] == ["user: 止めた後の質問", "bot: 止めた後の質問"]

        echo.slow(1.0, hold, pieces=8)
        send(page, long)
        wait_bot_text(page, long[:4])
        page.click("#chat-clear")
        wait_closed(echo, closed + 2)
        page.wait_for_timeout(1500)  # a reply that went on would show again by now
        assert chat_log(page) == [] and "cleared" in page.inner_text("#api-status")
        echo.slow(0.02)
        send(page, "新しい話")
        wait_status(page, "done · 1 turn")
        assert chat_log(page) == ["user: 新しい話", "bot: 新しい話"]
        assert echo.closed_early == closed + 2  # the replies that ended were not cut
    finally:
        hold.set()
        echo.slow(0.02)
        page.close()


def test_a_message_sent_again_is_answered_in_its_place(browser, ui, echo):
    """The same text sent twice is two messages: stop pressed after a reply's last piece (its stream held open
    before the end), then the same message again; each reply is drawn under its own message, and the context sent
    with the second holds the first exchange."""
    page = open_page(browser, ui)
    text = "もう一度聞きます"
    hold = threading.Event()
    try:
        echo.slow(0.05, hold)
        closed = echo.closed_early
        send(page, text)
        assert echo.holding.wait(15)
        wait_bot_text(page, text)
        page.click("#chat-stop")  # every piece is on the page; the stream has not ended yet
        wait_closed(echo, closed + 1)
        wait_status(page, "stopped")
        echo.slow(0.02)
        send(page, text)
        wait_status(page, "done · 2 turn")
        send(page, text)
        wait_status(page, "done · 3 turn")
        assert chat_log(page) == [
            f"user: {text}",
            f"bot: {text} ⏹ stopped",
            f"user: {text}",
            f"bot: {text}",
            f"user: {text}",
            f"bot: {text}",
        ]
        sent = echo.requests[-1]["messages"]
        assert [m["role"] for m in sent if m["role"] != "system"] == ["user", "assistant"] * 2 + ["user"]
    finally:
        hold.set()
        echo.slow(0.02)
        page.close()


def test_content_security_policy(ui):
    """The page's own origin only, and no eval: even markup that got through could fetch nothing elsewhere."""
    policy = httpx.get(ui, timeout=10).headers["content-security-policy"]
    rules = {r.split()[0]: r.split()[1:] for r in policy.split("; ")}
    for directive in ("default-src", "img-src", "font-src", "connect-src"):
        assert rules[directive] == ["'self'"], policy
    assert rules["script-src"][0] == "'self'" and all(s.startswith("'sha256-") for s in rules["script-src"][1:])
    assert rules["style-src"] == ["'self'", "'unsafe-inline'"] and rules["object-src"] == ["'none'"]
    assert "api/" not in policy and "http" not in policy


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_accessible_and_fits(browser, ui, viewport):
    """axe-core finds nothing serious or critical on any tab, nothing is wider than the screen, the status line wraps
    inside it, nothing covers the top message, the hovered secondary button stays readable, a model name's
    underscore is not clipped, and (on a phone) the monitor shows its one-column figure; Gradio itself runs under
    the page's policy without a violation."""
    page = open_page(browser, ui, viewport)
    width = viewport["width"]
    picker = page.locator("#model-picker input")
    drawn = picker.screenshot()
    page.evaluate(
        "() => { const i = document.querySelector('#model-picker input'); i.value = i.value.replaceAll('_', ' '); }"
    )
    assert picker.screenshot() != drawn  # the underscores in the model's name are drawn, not clipped
    page.fill("#chat-input textarea", "こんにちは <b>太字</b>")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => document.querySelectorAll("
        "'#chatbot .message.user, #chatbot .message.bot').length === 2"
        " && document.querySelector('#api-status').innerText.includes('done')"
    )
    problems = {"chat": axe_violations(page)}
    rect = page.evaluate(
        "() => { const r = document.querySelector('#api-status').getBoundingClientRect(); return [r.left, r.right]; }"
    )
    assert 0 <= rect[0] and rect[1] <= width, rect
    first = page.locator("#chatbot .message.user").first.bounding_box()
    covering = page.evaluate(
        """([x, y]) => { const e = document.elementFromPoint(x, y);
        return e.closest('#chatbot .message') ? null : e.outerHTML.slice(0, 200); }""",
        [first["x"] + 8, first["y"] + 6],
    )
    assert covering is None  # nothing lies over the top message
    assert not page.locator("#chatbot [data-testid='block-label']").is_visible()  # the floating "chat" label did

    page.hover("#chat-clear")
    page.wait_for_timeout(400)  # the hover transition
    colours = page.evaluate("""() => { const s = getComputedStyle(document.querySelector('#chat-clear'));
        return [s.color, s.backgroundColor]; }""")
    assert contrast(*colours) >= 4.5, colours

    page.get_by_role("tab", name="Soul monitor").click()
    page.get_by_label("run", exact=True).click()
    page.locator('li[role="option"]:visible').first.click()
    plot = "#soul-plot-tall" if width < 700 else "#soul-plot"
    page.wait_for_function(
        f"() => {{ const i = document.querySelector('{plot} img');"
        " return i && i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0; }",
        timeout=30_000,
    )
    shown, natural = page.evaluate(
        f"() => {{ const i = document.querySelector('{plot} img');"
        " return [i.getBoundingClientRect().width, i.naturalWidth]; }"
    )
    assert shown <= width and natural <= 1.6 * shown, (shown, natural)  # not shrunk past reading
    problems["monitor"] = axe_violations(page)
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_selector("#compare-prompt textarea")
    problems["compare"] = axe_violations(page)
    assert problems == {"chat": [], "monitor": [], "compare": []}
    overflow = page.evaluate("() => document.documentElement.scrollWidth")
    assert overflow <= width, overflow
    assert page.evaluate("() => window.cspViolations") == []
    assert outside(page, ui) == []
    page.close()


def contrast(fg: str, bg: str) -> float:
    """WCAG contrast ratio of two CSS rgb()/rgba() colours (the background taken as opaque)."""

    def luminance(css):
        parts = [float(v) for v in css[css.index("(") + 1 : -1].replace("/", ",").split(",")[:3]]
        lin = [c / 255 / 12.92 if c / 255 <= 0.03928 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in parts]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted([luminance(fg), luminance(bg)], reverse=True)
    return (hi + 0.05) / (lo + 0.05)
