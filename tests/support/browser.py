"""The chat page's browser tests: the UI as a real process, Debian's Chromium driven by Playwright, and the checks
more than one test module makes (axe-core, tofu glyphs, requests leaving the page's origin)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .serving import REPO, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1400, "height": 900}
PHONE = {"width": 390, "height": 844}
PLACEHOLDER = "メッセージを入力… (Enter で送信)"


@contextlib.contextmanager
def ui_process(api: str, log: Path, *args: str):
    """`python -m serve.ui --api API ARGS` on a free loopback port; yields the page's URL once it answers."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve.ui", "--api", api, "--port", str(port), *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the UI did not come up:\n" + log.read_text()
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


@contextlib.contextmanager
def chromium():
    """Debian's Chromium, headless, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def browser():
    """A fixture a browser test module imports: one Chromium for the module."""
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def ui(ui_api, runs_root, tmp_path_factory):
    """A fixture a browser test module imports: the chat page against the module's `ui_api` (a URL), its Soul
    monitor reading the module's `runs_root`."""
    with ui_process(ui_api, tmp_path_factory.mktemp("ui") / "ui.log", "--runs", str(runs_root)) as url:
        yield url


def open_page(browser, url: str, viewport: dict = DESKTOP):
    """A fresh page at url that records every request it makes (page.requests) and every Content-Security-Policy
    violation (window.cspViolations), ready once the API status line says connected."""
    page = browser.new_page(viewport=viewport)
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.add_init_script(
        "window.cspViolations = []; document.addEventListener('securitypolicyviolation',"
        " e => window.cspViolations.push("
        "[e.violatedDirective, e.blockedURI, e.sourceFile, e.lineNumber].join(' ')));"
    )
    page.goto(url, wait_until="load")  # not networkidle: the page keeps a heartbeat stream open (its session state)
    page.wait_for_selector("#api-status .api-ok", timeout=60_000)
    return page


def outside(page, url: str) -> list[str]:
    """The requests the page made anywhere but its own origin."""
    origin = url.rstrip("/")
    return [u for u in page.requests if not (u == origin or u.startswith(origin + "/"))]


def axe_violations(page, impacts=("serious", "critical")) -> list[str]:
    """axe-core's violations of these impacts on the page as it is now, one line each."""
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page).response["violations"]
    return [
        f"{v['id']} ({v['impact']}): {v['help']} — {[n['target'] for n in v['nodes']][:4]}"
        for v in found
        if v["impact"] in impacts
    ]


# Draws each character of a text in the given element's font on a canvas and compares it with the drawing of a
# private-use character no font has (the "tofu" box): a character drawn the same has no glyph on this machine.
TOFU = """([selector, text]) => {
    const el = document.querySelector(selector);
    const font = getComputedStyle(el).fontSize + ' ' + getComputedStyle(el).fontFamily;
    const c = document.createElement('canvas'); c.width = 64; c.height = 64;
    const g = c.getContext('2d', {willReadFrequently: true});
    const draw = ch => { g.clearRect(0, 0, 64, 64); g.font = font; g.fillText(ch, 4, 44);
                         return [g.measureText(ch).width, g.getImageData(0, 0, 64, 64).data.join(',')]; };
    const box = draw('\\uE000');
    return [...new Set(text)].filter(ch => ch.trim() && ch.charCodeAt(0) > 0x2000)
        .filter(ch => { const [w, px] = draw(ch); return w === box[0] && px === box[1]; });
}"""


def tofu(page, selector: str, text: str) -> list[str]:
    """The characters of text that the element's font stack cannot draw on this machine."""
    return page.evaluate(TOFU, [selector, text])


def pick(page, label: str, value: str) -> None:
    """Choose value (an option's text) in the Gradio dropdown labelled label."""
    page.get_by_label(label, exact=True).click()
    page.locator(f'li[role="option"][aria-label="{value}"]:visible').first.click()


def set_number(page, label: str, value, within: str = "#chat-settings") -> None:
    """Set a Gradio slider (in the element within) through its number box, and wait until the slider itself shows
    the value."""
    box = page.locator(within).get_by_label(f"number input for {label}", exact=True)
    slider = page.locator(within).get_by_label(f"range slider for {label}", exact=True)
    for attempt in range(3):  # an edit made while the settings panel is still opening can be dropped: type it again
        box.fill(str(value))
        box.press("Enter")
        box.blur()
        try:
            page.wait_for_function(
                "([el, v]) => Number(el.value) === v", arg=[slider.element_handle(), float(value)], timeout=10_000
            )
            return
        except Exception:
            if attempt == 2:
                raise
