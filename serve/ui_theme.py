"""AEGIS's look: dark, neon accents, monospace. Its one web font ships with it and is served by the UI itself
(nothing is fetched from a font service, so the page works offline)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

NEON = {"bg": "#07070d", "panel": "#0e0f1a", "grid": "#2a2d45", "text": "#d7dcff", "dim": "#7b80a8",
        "cyan": "#00f0ff", "magenta": "#ff2bd6", "green": "#39ff88", "amber": "#ffb000", "gold": "#ffd84d",
        "blue": "#5a8cff", "red": "#ff4d6d"}

# Noto Sans JP, regular, the "japanese" subset (kana, JIS X 0208 kanji levels 1 and 2, ASCII, full-width forms:
# 6,886 characters in 1 MB) from npm's @fontsource/noto-sans-jp 5.3.0 (files/noto-sans-jp-japanese-400-normal.woff2),
# under the SIL Open Font License (fonts/LICENSE). A machine without a Japanese font showed kana and kanji as boxes.
FONTS = Path(__file__).resolve().parent / "static" / "fonts"
JAPANESE = "Noto Sans JP"
JAPANESE_FILE = FONTS / "noto-sans-jp-japanese-400-normal.woff2"

# Latin monospace first (they have no kana or kanji), then the shipped Japanese font, so Japanese looks the same on
# every machine; then system Japanese fonts for the rare kanji the subset lacks
MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "DejaVu Sans Mono", "Liberation Mono", JAPANESE,
        "Noto Sans Mono CJK JP", "Osaka-Mono", "MS Gothic", "IPAGothic", "monospace"]

# Gradio serves files under allowed_paths at gradio_api/file=PATH; the URL is relative to the page, so the font is
# found also behind a proxy that mounts the UI under a prefix.
FONT_FACE = f"""
@font-face {{ font-family: "{JAPANESE}"; font-style: normal; font-weight: 400; font-display: swap;
  src: url("gradio_api/file={quote(str(JAPANESE_FILE))}") format("woff2"); }}
"""

CSS = FONT_FACE + """
.gradio-container { background: radial-gradient(ellipse at top, #12132a 0%, #07070d 60%) !important; }
#aegis-title h1 { color: #00f0ff; text-shadow: 0 0 6px #00f0ff, 0 0 18px #ff2bd6; letter-spacing: .12em;
  margin: .2em 0 0 0; }
#aegis-title p { color: #7b80a8; margin: 0; }
.soul-status { font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", "Noto Sans JP", monospace;
  color: #d7dcff; padding: .5em .2em; }
.phase-badge { display: inline-block; border: 1px solid; border-radius: 3px; padding: 0 .6em; margin-right: .6em;
  font-weight: bold; letter-spacing: .1em; box-shadow: 0 0 8px currentColor; }
.run-state { color: #39ff88; margin-right: .6em; }
.api-error { color: #ff4d6d; font-weight: bold; }
.api-ok { color: #39ff88; }
button.primary { box-shadow: 0 0 10px #ff2bd6aa; }
"""


def theme():
    import gradio as gr

    t = gr.themes.Base(primary_hue=gr.themes.colors.fuchsia, secondary_hue=gr.themes.colors.cyan,
                       neutral_hue=gr.themes.colors.slate, font=MONO, font_mono=MONO, radius_size="sm")
    dark = dict(
        body_background_fill=NEON["bg"], body_text_color=NEON["text"], body_text_color_subdued=NEON["dim"],
        background_fill_primary=NEON["panel"], background_fill_secondary="#0b0c16",
        block_background_fill=NEON["panel"], block_border_color=NEON["grid"], block_label_text_color=NEON["cyan"],
        block_title_text_color=NEON["cyan"], border_color_primary=NEON["grid"], border_color_accent=NEON["magenta"],
        input_background_fill="#0b0c16", input_border_color=NEON["grid"], input_border_color_focus=NEON["cyan"],
        button_primary_background_fill=NEON["magenta"], button_primary_background_fill_hover="#ff5ce0",
        button_primary_text_color="#07070d", button_secondary_background_fill="#151730",
        button_secondary_text_color=NEON["cyan"], button_secondary_border_color=NEON["cyan"],
        color_accent=NEON["magenta"], color_accent_soft="#2a0f2a", link_text_color=NEON["cyan"],
        slider_color=NEON["cyan"], checkbox_background_color="#0b0c16", table_even_background_fill=NEON["panel"],
        table_odd_background_fill="#0b0c16",
    )
    # the same colours whatever the visitor's light/dark preference: this UI has one look
    return t.set(**dark, **{f"{k}_dark": v for k, v in dark.items() if k != "color_accent"})
