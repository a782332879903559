"""python -m serve.ui --api http://HOST:8000/v1 [--api-key KEY] [--runs DIR] [--host 127.0.0.1] [--port 7860]

A chat front end for the API. It speaks only the OpenAI protocol (models, streamed chat completions), so it works
against any compatible server. Tabs: Chat, Soul monitor (live training metrics of runs under --runs) and Compare
(one prompt to two models side by side).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_SYSTEM = "あなたは親切で正確な日本語アシスタントです。"


class UIError(Exception):
    """Something the person at the UI should read (the API is down, refused the key, rejected a value ...)."""


def explain(e: Exception, api: str) -> str:
    """One clear line for an error of the openai client."""
    import openai

    if isinstance(e, openai.APITimeoutError):
        return f"the API at {api} did not answer in time"
    if isinstance(e, openai.APIConnectionError):
        return f"cannot reach the API at {api}: is the server running?"
    if isinstance(e, openai.APIStatusError):
        body = e.body if isinstance(e.body, dict) else {}
        detail = body.get("message") or (body.get("error") or {}).get("message") if body else None
        return f"the API answered {e.status_code}: {detail or e.message}"
    if isinstance(e, openai.APIError):
        return f"the API reported an error: {e.message}"
    return f"{type(e).__name__}: {e}"


class Api:
    """The OpenAI-protocol calls the UI makes."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 120.0):
        import openai

        self.base_url = base_url
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=timeout)

    def models(self) -> list[str]:
        try:
            return [m.id for m in self.client.models.list().data]
        except Exception as e:  # noqa: BLE001 - every failure becomes a message on the page
            raise UIError(explain(e, self.base_url)) from e

    def stream(self, model: str, messages: list[dict], temperature: float, top_p: float, max_tokens: int,
               stop: list[str]) -> Iterator[str]:
        if not model:
            raise UIError("no model selected (is the API up? press ⟳ to reload the list)")
        try:
            chunks = self.client.chat.completions.create(
                model=model, messages=messages, temperature=temperature, top_p=top_p, max_tokens=int(max_tokens),
                stop=stop or None, stream=True)
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except UIError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UIError(explain(e, self.base_url)) from e


def parse_stops(text: str) -> list[str]:
    """Stop sequences, one per line (escapes like \\n are understood)."""
    stops = []
    for line in (text or "").splitlines():
        if line:
            stops.append(line.encode("utf-8").decode("unicode_escape") if "\\" in line else line)
    return stops[:4]


def status_html(text: str, ok: bool) -> str:
    import html
    return f'<span class="{"api-ok" if ok else "api-error"}">{"●" if ok else "✖"} {html.escape(text)}</span>'


def build(api: Api, runs: Path | None):
    import gradio as gr

    from . import ui_monitor

    def refresh_models(current=None):
        try:
            names = api.models()
        except UIError as e:
            return gr.update(choices=[], value=None), gr.update(choices=[], value=None), \
                gr.update(choices=[], value=None), status_html(str(e), False)
        pick = current if current in names else (names[0] if names else None)
        second = names[1] if len(names) > 1 else pick
        return (gr.update(choices=names, value=pick), gr.update(choices=names, value=pick),
                gr.update(choices=names, value=second),
                status_html(f"connected to {api.base_url}: {len(names)} model(s)", True))

    def chat(message, history, model, system, temperature, top_p, max_tokens, stop):
        history = list(history or [])
        if not (message or "").strip():
            yield history, "", gr.update()
            return
        messages = ([{"role": "system", "content": system}] if (system or "").strip() else [])
        messages += [{"role": m["role"], "content": m["content"]} for m in history
                     if m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)]
        messages.append({"role": "user", "content": message})
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield history, "", status_html(f"{model}: generating…", True)
        try:
            for piece in api.stream(model, messages, temperature, top_p, max_tokens, parse_stops(stop)):
                history[-1]["content"] += piece
                yield history, "", gr.update()
        except UIError as e:
            if not history[-1]["content"]:
                history.pop()
            yield history, message, status_html(str(e), False)
            return
        turns = sum(1 for m in history if m.get("role") == "assistant")
        yield history, "", status_html(f"{model}: done · {turns} turn(s)", True)

    def compare_side(prompt, model, system, temperature, max_tokens):
        if not (prompt or "").strip():
            yield ""
            return
        messages = ([{"role": "system", "content": system}] if (system or "").strip() else [])
        messages.append({"role": "user", "content": prompt})
        text = ""
        try:
            for piece in api.stream(model, messages, temperature, 1.0, max_tokens, []):
                text += piece
                yield text
        except UIError as e:
            yield f"{text}\n\n✖ {e}" if text else f"✖ {e}"

    def run_choices():
        found = ui_monitor.list_runs(runs) if runs else []
        return [str(p) for p in found]

    def refresh_runs(current):
        choices = run_choices()
        return gr.update(choices=choices, value=current if current in choices else (choices[0] if choices else None))

    def monitor(run):
        return ui_monitor.snapshot(Path(run) if run else None)

    with gr.Blocks(title="AEGIS", analytics_enabled=False) as demo:
        gr.Markdown("# AEGIS\nsouled Japanese chat · OpenAI protocol", elem_id="aegis-title")
        with gr.Row():
            model = gr.Dropdown(label="model", choices=[], scale=3, elem_id="model-picker")
            reload_btn = gr.Button("⟳ models", scale=1, variant="secondary")
            api_status = gr.HTML(status_html(f"connecting to {api.base_url}…", True), elem_id="api-status")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chatbot = gr.Chatbot(label="chat", height=430, elem_id="chatbot", buttons=["copy", "copy_all"],
                                     feedback_options=None)
                with gr.Row():
                    msg = gr.Textbox(placeholder="メッセージを入力… (Enter で送信)", show_label=False, scale=5,
                                     elem_id="chat-input")
                    send = gr.Button("send", variant="primary", scale=1, elem_id="chat-send")
                    clear = gr.Button("clear", variant="secondary", scale=1)
                with gr.Accordion("settings", open=False):
                    system = gr.Textbox(label="system prompt", value=DEFAULT_SYSTEM, lines=2)
                    with gr.Row():
                        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature")
                        top_p = gr.Slider(0.0, 1.0, value=0.95, step=0.01, label="top-p")
                        max_tokens = gr.Slider(1, 2048, value=256, step=1, label="max tokens")
                    stop = gr.Textbox(label="stop sequences (one per line, up to 4)", lines=2)
            with gr.Tab("Soul monitor", id="monitor"):
                if runs is None:
                    gr.Markdown("start the UI with `--runs DIR` to watch the training runs under DIR")
                with gr.Row():
                    run_dd = gr.Dropdown(label="run", choices=run_choices(), scale=4, elem_id="run-picker")
                    runs_btn = gr.Button("⟳ runs", scale=1, variant="secondary")
                    live = gr.Checkbox(value=True, label="live (refresh every 2 s)", scale=1)
                badge = gr.HTML(elem_id="soul-badge")
                plot = gr.Image(label="soul metrics", type="pil", interactive=False, elem_id="soul-plot",
                                buttons=[])
                timer = gr.Timer(2.0)
            with gr.Tab("Compare", id="compare"):
                cmp_prompt = gr.Textbox(label="prompt", lines=2, elem_id="compare-prompt")
                with gr.Row():
                    cmp_temp = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature")
                    cmp_max = gr.Slider(1, 1024, value=200, step=1, label="max tokens")
                    cmp_btn = gr.Button("compare", variant="primary", elem_id="compare-run")
                with gr.Row():
                    with gr.Column():
                        model_a = gr.Dropdown(label="model A (e.g. base)", choices=[], elem_id="model-a")
                        out_a = gr.Textbox(label="A", lines=12, interactive=False, elem_id="compare-a")
                    with gr.Column():
                        model_b = gr.Dropdown(label="model B (e.g. souled)", choices=[], elem_id="model-b")
                        out_b = gr.Textbox(label="B", lines=12, interactive=False, elem_id="compare-b")

        pickers = [model, model_a, model_b, api_status]
        demo.load(refresh_models, inputs=[model], outputs=pickers)
        reload_btn.click(refresh_models, inputs=[model], outputs=pickers)
        chat_inputs = [msg, chatbot, model, system, temperature, top_p, max_tokens, stop]
        msg.submit(chat, chat_inputs, [chatbot, msg, api_status])
        send.click(chat, chat_inputs, [chatbot, msg, api_status])
        clear.click(lambda: ([], ""), None, [chatbot, msg])
        cmp_btn.click(compare_side, [cmp_prompt, model_a, system, cmp_temp, cmp_max], out_a)
        cmp_btn.click(compare_side, [cmp_prompt, model_b, system, cmp_temp, cmp_max], out_b)
        runs_btn.click(refresh_runs, [run_dd], run_dd)
        run_dd.change(monitor, run_dd, [badge, plot])
        demo.load(monitor, run_dd, [badge, plot])
        timer.tick(monitor, run_dd, [badge, plot])
        live.change(lambda on: gr.Timer(active=on), live, timer)
    return demo


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m serve.ui", description=__doc__.splitlines()[0])
    ap.add_argument("--api", default="http://127.0.0.1:8000/v1", help="base URL of an OpenAI-compatible API")
    ap.add_argument("--api-key", default=None, help="key for the API (default: $AEGIS_API_KEY, else none)")
    ap.add_argument("--runs", type=Path, default=None, help="directory with training runs for the Soul monitor")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    ap.add_argument("--port", type=int, default=7860)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    url = urlparse(args.api)
    if url.scheme not in ("http", "https") or not url.netloc:
        ap.error(f"--api {args.api!r}: expected a URL like http://127.0.0.1:8000/v1")
    if args.runs is not None and not args.runs.is_dir():
        ap.error(f"--runs {args.runs}: not a directory")
    if not 0 < args.port < 65536:
        ap.error(f"--port {args.port}: not a TCP port")
    # nothing may phone home: the page must work offline
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .ui_theme import CSS, FONTS, theme

    key = args.api_key if args.api_key is not None else os.environ.get("AEGIS_API_KEY")
    demo = build(Api(args.api.rstrip("/"), key), args.runs)
    demo.queue(default_concurrency_limit=8)
    demo.launch(server_name=args.host, server_port=args.port, theme=theme(), css=CSS, ssr_mode=False,
                footer_links=[], show_error=True, quiet=False, allowed_paths=[str(FONTS)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
