"""AEGIS's look and what its page may load: dark, neon accents, monospace; its one web font ships with it and is
served by the UI itself (nothing is fetched from a font service, so the page works offline). `PagePolicy` gives the
page a Content-Security-Policy (everything from the UI's own origin only) and links the font and its stylesheet in
the page's head, so the font is declared and loading at first paint."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from urllib.parse import quote

NEON = {
    "bg": "#07070d",
    "panel": "#0e0f1a",
    "grid": "#2a2d45",
    "text": "#d7dcff",
    "dim": "#7b80a8",
    "cyan": "#00f0ff",
    "magenta": "#ff2bd6",
    "green": "#39ff88",
    "amber": "#ffb000",
    "gold": "#ffd84d",
    "blue": "#5a8cff",
    "red": "#ff4d6d",
}

# Noto Sans JP, regular, the "japanese" subset (kana, JIS X 0208 kanji levels 1 and 2, ASCII, full-width forms:
# 6,886 characters in 1 MB) from npm's @fontsource/noto-sans-jp 5.3.0 (files/noto-sans-jp-japanese-400-normal.woff2),
# under the SIL Open Font License (fonts/LICENSE). With it, kana and kanji render on a machine with no Japanese font.
STATIC = Path(__file__).resolve().parent / "static"
FONTS = STATIC / "fonts"
JAPANESE = "Noto Sans JP"
JAPANESE_FILE = FONTS / "noto-sans-jp-japanese-400-normal.woff2"

# Latin monospace first (they have no kana or kanji), then the shipped Japanese font, so Japanese looks the same on
# every machine; then system Japanese fonts for the rare kanji the subset lacks
MONO = [
    "ui-monospace",
    "SFMono-Regular",
    "Menlo",
    "Consolas",
    "DejaVu Sans Mono",
    "Liberation Mono",
    JAPANESE,
    "Noto Sans Mono CJK JP",
    "Osaka-Mono",
    "MS Gothic",
    "IPAGothic",
    "monospace",
]


def static_url(path: Path) -> str:
    """Gradio serves files under allowed_paths at gradio_api/file=PATH; the URL is relative to the page (whose
    <base> is its own directory), so it is found also behind a proxy that mounts the UI under a prefix."""
    return f"gradio_api/file={quote(str(path))}"


# In the page's head before Gradio's own scripts run: the font is fetched at once and declared (page.css holds its
# @font-face); page.js asks for it right away, since a font is otherwise loaded only when text on the page needs
# it, and Chromium does not count an input's placeholder as such text.
HEAD = (
    f'<link rel="preload" href="{static_url(JAPANESE_FILE)}" as="font" type="font/woff2" crossorigin>'
    f'<link rel="stylesheet" href="{static_url(STATIC / "page.css")}">'
    f'<script src="{static_url(STATIC / "page.js")}"></script>'
).encode()

CSS = """
.gradio-container { background: radial-gradient(ellipse at top, #12132a 0%, #07070d 60%) !important; }
#aegis-title h1 { color: #00f0ff; text-shadow: 0 0 6px #00f0ff, 0 0 18px #ff2bd6; letter-spacing: .12em;
  margin: .2em 0 0 0; }
#aegis-title p { color: #9ea3c8; margin: 0; }
.soul-status { color: #d7dcff; padding: .5em .2em; overflow-wrap: anywhere; }
.phase-badge { display: inline-block; border: 1px solid; border-radius: 3px; padding: 0 .6em; margin-right: .6em;
  font-weight: bold; letter-spacing: .1em; box-shadow: 0 0 8px currentColor; color: #9ea3c8; }
.phase-chaos { color: #ff2bd6; } .phase-transition { color: #ffb000; } .phase-golden { color: #ffd84d; }
.run-state { color: #39ff88; margin-right: .6em; }
.api-error { color: #ff6b85; font-weight: bold; }
.api-ok { color: #39ff88; }
.api-wait { color: #9ea3c8; }
#api-status { overflow-wrap: anywhere; min-width: 0; }
button.primary { box-shadow: 0 0 10px #ff2bd6aa; }
/* messages are plain text: keep their line breaks and runs of spaces */
#chatbot .message-markdown-disabled, #chatbot .message-content { white-space: pre-wrap; overflow-wrap: anywhere; }
.turn-note { display: block; margin-top: .3em; font-size: .85em; color: #9ea3c8; white-space: normal; }
.turn-failed, .turn-cut { color: #ff6b85; }
/* a dropdown's text box as tall as its text: cut at its line's height, it clips an underscore (q8_0 reads q8 0) */
.secondary-wrap input[role="combobox"] { height: auto !important; padding: 4px 0 !important; }
input[type="checkbox"]:checked, input[type="radio"]:checked { box-shadow: inset 0 0 0 3px #0b0c16 !important; }
/* drawn again once the Japanese font is in (page.js), in case its first drawing came before the font */
.ja-font #chat-input textarea::placeholder { letter-spacing: 0; }
/* the monitor: the wide figure on wide screens, the one-column figure on a phone */
#soul-plot-tall { display: none; }
@media (max-width: 720px) { #soul-plot { display: none; } #soul-plot-tall { display: block; } }
/* a phone: nothing wider than the screen */
@media (max-width: 720px) { .gradio-container { padding: 0 6px !important; } #top-row, #chat-row { flex-wrap: wrap; } }
"""


# Gradio's theme variables by the colour each takes: the palette's, and a few shades between them
_PAINT = {
    NEON["bg"]: ("body_background_fill", "button_primary_text_color"),
    NEON["text"]: ("body_text_color",),
    NEON["dim"]: ("body_text_color_subdued",),
    NEON["panel"]: ("background_fill_primary", "block_background_fill", "table_even_background_fill"),
    NEON["grid"]: ("block_border_color", "border_color_primary", "input_border_color"),
    NEON["cyan"]: (
        "block_label_text_color",
        "block_title_text_color",
        "input_border_color_focus",
        "button_secondary_text_color",
        "button_secondary_border_color",
        "link_text_color",
        "slider_color",
    ),
    NEON["magenta"]: ("border_color_accent", "button_primary_background_fill", "color_accent"),
    "#0b0c16": (
        "background_fill_secondary",
        "input_background_fill",
        "checkbox_background_color",
        "table_odd_background_fill",
    ),
    "#ff5ce0": ("button_primary_background_fill_hover",),
    "#151730": ("button_secondary_background_fill",),
    # hovered, the secondary buttons keep their cyan text on a dark face (Gradio's light default gives 1.3:1)
    "#1d2046": ("button_secondary_background_fill_hover",),
    "#7df7ff": ("button_secondary_text_color_hover", "button_secondary_border_color_hover"),
    "#2a0f2a": ("color_accent_soft",),
}


def theme():
    import gradio as gr

    t = gr.themes.Base(
        primary_hue=gr.themes.colors.fuchsia,
        secondary_hue=gr.themes.colors.cyan,
        neutral_hue=gr.themes.colors.slate,
        font=MONO,
        font_mono=MONO,
        radius_size="sm",
    )
    dark = {name: colour for colour, names in _PAINT.items() for name in names}
    # the same colours whatever the visitor's light/dark preference: this UI has one look
    # Gradio draws the tick and the radio dot as data: images, which the page's policy does not allow: a checked box
    # is shown by its fill and an inner ring instead (CSS above)
    return t.set(
        **dark,
        **{f"{k}_dark": v for k, v in dark.items() if k != "color_accent"},
        checkbox_check="none",
        radio_circle="none",
    )


def _inline_script_hashes(page: str) -> list[str]:
    """CSP source expressions for the page's inline scripts (Gradio's index page holds its config in a few)."""
    found = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", page, flags=re.S | re.I)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found]


def content_security_policy(page: str) -> str:
    """Everything from the UI's own origin. Scripts: Gradio's files, and its page's own inline scripts by hash (no
    eval: the page uses no component that needs it). Styles also inline, because Gradio's components set style
    attributes and it injects the theme's and the page's CSS as <style> elements; no image, font or connection
    anywhere else, so text in a message can never make the browser contact another host."""
    return "; ".join(
        [
            "default-src 'self'",
            f"script-src 'self' {' '.join(_inline_script_hashes(page))}",
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self'",
            "font-src 'self'",
            "connect-src 'self'",
            "media-src 'self'",
            "object-src 'none'",
            "frame-src 'none'",
            "worker-src 'self'",
            "base-uri 'self'",
            "form-action 'self'",
            "frame-ancestors 'self'",
        ]
    )


class PagePolicy:
    """ASGI middleware for Gradio's app: every HTML page it serves gets HEAD in its head and the policy above as a
    header. Other responses (the API, the event streams, files) pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict = {}
        parts: list[bytes] = []

        async def hold_html(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"text/html"):
                    held["start"] = message
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                parts.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                page = b"".join(parts).replace(b"</head>", HEAD + b"</head>", 1)
                policy = content_security_policy(page.decode("utf-8", "replace")).encode()
                headers = [
                    (k, v)
                    for k, v in held["start"].get("headers", [])
                    if k.lower() not in (b"content-length", b"content-security-policy")
                ]
                headers += [(b"content-length", str(len(page)).encode()), (b"content-security-policy", policy)]
                await send({**held["start"], "headers": headers})
                await send({"type": "http.response.body", "body": page})
                return
            await send(message)

        await self.app(scope, receive, hold_html)
