"""python -m serve.ui --api http://HOST:8000/v1 [--api-key KEY] [--runs DIR] [--base NAME] [--host 127.0.0.1]
[--port 7860]

A chat front end for the API. It speaks only the OpenAI protocol (models, streamed chat completions), so it works
against any compatible server. Tabs: Chat, Soul monitor (live training metrics of runs under --runs) and Compare
(one prompt to two models side by side; the untrained base, --base, is offered there and not for chatting).
"""

from __future__ import annotations

import argparse
import asyncio
import html
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_SYSTEM = "あなたは親切で正確な日本語アシスタントです。"
STOP_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


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


@dataclass
class Model:
    id: str
    context: int | None  # tokens, from /v1/models' context_length (None where the server does not say)
    base: bool  # the untrained base: offered for Compare, not for chatting


class Api:
    """The OpenAI-protocol calls the UI makes (async, so that a stopped reply closes its HTTP stream at once, which
    is what cancels the generation on the server)."""

    def __init__(self, base_url: str, api_key: str | None, base_name: str = "base", timeout: float = 120.0):
        import openai

        self.base_url = base_url
        self.base_name = base_name
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0,
                                         timeout=timeout)

    async def models(self) -> list[Model]:
        """Trained models first (in the server's order), the base last."""
        try:
            found = (await self.client.models.list()).data
        except Exception as e:  # noqa: BLE001 - every failure becomes a message on the page
            raise UIError(explain(e, self.base_url)) from e
        models = [Model(m.id, getattr(m, "context_length", None), m.id == self.base_name) for m in found]
        return sorted(models, key=lambda m: m.base)

    async def stream(self, model: str, messages: list[dict], temperature: float, top_p: float, max_tokens: int,
                     stop: list[str]) -> AsyncIterator[str]:
        if not model:
            raise UIError("no model selected (is the API up? press ⟳ to reload the list)")
        limit: int | None = int(max_tokens)
        while True:
            try:
                chunks = await self.client.chat.completions.create(
                    model=model, messages=messages, temperature=temperature, top_p=top_p, max_tokens=limit,
                    stop=stop or None, stream=True)
                break
            except Exception as e:  # noqa: BLE001
                if getattr(e, "code", None) != "context_length_exceeded":
                    raise UIError(explain(e, self.base_url)) from e
                # as chat apps do: the oldest turns leave the window first; a lone message too long for the
                # chosen max tokens gets the rest of the context instead (the server's default)
                shorter = fit(messages)
                if shorter is not None:
                    messages = shorter
                elif limit is not None:
                    limit = None
                else:
                    raise UIError(explain(e, self.base_url)) from e
        try:
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except Exception as e:  # noqa: BLE001
            raise UIError(explain(e, self.base_url)) from e
        finally:  # also when the reader is cancelled (stop, clear): closing the stream ends the generation
            await chunks.close()


def fit(messages: list[dict]) -> list[dict] | None:
    """The messages without their oldest exchange (the system message and the last message stay), or None when
    nothing is left to drop."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    if len(rest) <= 1:
        return None
    rest = rest[1:]
    while len(rest) > 1 and rest[0]["role"] != "user":  # a window starts with the person's message
        rest = rest[1:]
    return system + rest


def parse_stops(text: str) -> list[str]:
    """Stop sequences, one per line; \\n, \\t, \\r and \\\\ are understood, any other backslash is kept as typed."""
    unescape = lambda m: STOP_ESCAPES.get(m.group(1), m.group(0))  # noqa: E731
    stops = [re.sub(r"\\(.)", unescape, line) for line in (text or "").splitlines() if line]
    return stops[:4]


def label(m: Model) -> str:
    return f"{m.id} · untrained base" if m.base else f"{m.id} · trained"


def max_tokens_limit(context: int | None) -> int:
    """The largest max_tokens the slider offers: half the model's context, the other half left for the chat."""
    return max(16, (context or 2048) // 2)


def status_html(text: str, ok: bool | None) -> str:
    """The status line: ok, an error, or (None) waiting for the API's first answer."""
    kind, mark = {True: ("api-ok", "●"), False: ("api-error", "✖"), None: ("api-wait", "○")}[ok]
    # a <div> is an HTML block to the Markdown component: its text is not read as markdown, so escaping is enough
    return f'<div class="{kind}" role="status">{mark} {html.escape(text)}</div>'


# ---- the conversation ---------------------------------------------------------------------------------------------

@dataclass
class Turn:
    role: str  # user | assistant
    text: str
    state: str = "sent"  # user: queued | sent | failed; assistant: writing | sent | stopped | cut


NOTES = {"queued": "⏳ queued: sent when the reply above ends", "stopped": "⏹ stopped",
         "failed": "✖ not answered (see the status line): press retry to send it again",
         "cut": "✖ cut short by an error (see the status line)"}


@dataclass
class Conversation:
    """One browser session's chat. Sends only append to it; one loop (`drain`) answers the queued messages in
    order, so a message sent while a reply is coming is queued, never lost or sent twice."""

    turns: list[Turn] = field(default_factory=list)
    busy: bool = False
    reader: asyncio.Task | None = None  # reading the reply now being written
    era: int = 0  # bumped by clear: a reply of an earlier era is dropped

    def __deepcopy__(self, memo):  # gr.State copies its default for each session: each starts empty
        return Conversation()

    def queued(self) -> list[Turn]:
        return [t for t in self.turns if t.role == "user" and t.state == "queued"]

    def context(self, upto: Turn) -> list[dict]:
        """The chat so far as API messages: answered turns only (a failed message is not part of it)."""
        out = []
        for t in self.turns[:self.turns.index(upto)]:
            if (t.role == "user" and t.state == "sent") or (t.role == "assistant" and t.text):
                out.append({"role": t.role, "content": t.text})
        return out + [{"role": "user", "content": upto.text}]

    def cancel(self) -> None:
        if self.reader is not None:
            self.reader.cancel()

    def render(self) -> list[dict]:
        """For gr.Chatbot with markdown off: it still reads the content as HTML, so the text is escaped (a message
        is shown as typed, never turned into an element); the note is ours."""
        shown = []
        for t in self.turns:
            note = NOTES.get(t.state)
            empty = "…" if t.state == "writing" else "(no text)"
            body = html.escape(t.text) if t.text else (empty if t.role == "assistant" else "")
            if note:
                body += f'<span class="turn-note turn-{t.state}">{html.escape(note)}</span>'
            shown.append({"role": t.role, "content": body})
        return shown


# ---- the page -------------------------------------------------------------------------------------------------------

def build(api: Api, runs: Path | None):
    import gradio as gr

    from . import ui_monitor

    contexts: dict[str, int | None] = {}

    async def refresh_models(current=None):
        try:
            models = await api.models()
        except UIError as e:
            none = gr.update(choices=[], value=None)
            return none, none, none, status_html(str(e), False)
        contexts.update({m.id: m.context for m in models})
        trained = [m for m in models if not m.base]
        chat = [(label(m), m.id) for m in (trained or models)]
        every = [(label(m), m.id) for m in models]
        ids = [c[1] for c in chat]
        pick = current if current in ids else (ids[0] if ids else None)
        base = next((m.id for m in models if m.base), None)
        a = base or (models[0].id if models else None)
        b = next((m.id for m in trained if m.id != a), a)
        note = f"connected to {api.base_url}: {len(models)} model(s)"
        return (gr.update(choices=chat, value=pick), gr.update(choices=every, value=a),
                gr.update(choices=every, value=b), status_html(note, True))

    def bound_tokens(value, *models):
        known = [contexts.get(m) for m in models if m]
        limit = min(max_tokens_limit(c) for c in known) if known else max_tokens_limit(None)
        return gr.update(maximum=limit, value=min(int(value or 1), limit))

    async def send(message, convo: Conversation):
        """Queue a message: the box empties (only here, never while a reply streams) and the bubble shows."""
        if not (message or "").strip():
            return gr.skip(), gr.skip()
        convo.turns.append(Turn("user", message, "queued"))
        # while a reply streams, only its run writes the log (Gradio streams it as changes to what that run sent
        # last, so a second writer would garble it); the queued bubble shows with its next update
        return "", gr.skip() if convo.busy else convo.render()

    async def drain(convo: Conversation, model, system, temperature, top_p, max_tokens, stop):
        """Answer the queued messages in order, one loop per session: every send starts one; a later one waits
        until the running loop ends, then answers what it left. A loop takes no new message once it has said it is
        done (that message's own run answers it), so its last word is always its last update."""
        while convo.busy:
            await asyncio.sleep(0.05)
        if not convo.queued():
            yield gr.skip(), gr.skip(), gr.skip()
            return
        convo.busy = True
        try:
            while True:
                turn = convo.queued()[0]
                turn.state = "sent"
                reply = Turn("assistant", "", "writing")
                convo.turns.insert(convo.turns.index(turn) + 1, reply)
                messages = ([{"role": "system", "content": system}] if (system or "").strip() else [])
                messages += convo.context(turn)
                waiting = len(convo.queued())
                busy = f"{model}: generating…" + (f" ({waiting} queued)" if waiting else "")
                yield convo.render(), status_html(busy, True), gr.update(interactive=True)
                era, error, pieces = convo.era, None, asyncio.Queue()
                convo.reader = asyncio.create_task(_read(api, pieces, model, messages, temperature, top_p,
                                                         max_tokens, parse_stops(stop)))
                while True:
                    kind, value = await pieces.get()
                    while kind == "piece" and not pieces.empty():  # what came meanwhile goes out in one update
                        reply.text += value
                        kind, value = pieces.get_nowait()
                    if kind != "piece" or convo.era != era:
                        break
                    reply.text += value
                    yield convo.render(), gr.skip(), gr.skip()
                convo.reader = None
                reply.state = "sent"
                if kind == "stopped":
                    reply.state = "stopped"
                elif kind == "error":
                    error = value
                if convo.era != era:  # cleared meanwhile: nothing of this reply is kept
                    break
                if error:
                    if reply.text:
                        reply.state = "cut"
                    else:
                        convo.turns.remove(reply)
                        turn.state = "failed"
                    status = status_html(error, False)
                elif reply.state == "stopped":
                    status = status_html(f"{model}: stopped", True)
                else:
                    turns = sum(1 for t in convo.turns if t.role == "assistant")
                    status = status_html(f"{model}: done · {turns} turn(s)", True)
                if not convo.queued():  # the last word while still busy: a later run waits for it
                    yield convo.render(), status, gr.update(interactive=False)
                    break
                yield convo.render(), status, gr.update()
        finally:
            convo.busy = False
            convo.cancel()

    async def stop_reply(convo: Conversation):
        convo.cancel()

    async def clear_chat(convo: Conversation):
        convo.era += 1
        convo.cancel()
        convo.turns.clear()
        return [], status_html("cleared", True), gr.update(interactive=False)

    async def retry(convo: Conversation):
        failed = [t for t in convo.turns if t.role == "user" and t.state == "failed"]
        for t in failed:  # to the end of the chat, queued again: one bubble each, as before
            convo.turns.remove(t)
            t.state = "queued"
            convo.turns.append(t)
        return gr.skip() if convo.busy else convo.render()

    async def compare_side(prompt, model, system, temperature, max_tokens):
        if not (prompt or "").strip():
            yield ""
            return
        messages = ([{"role": "system", "content": system}] if (system or "").strip() else [])
        messages.append({"role": "user", "content": prompt})
        text = ""
        try:
            async for piece in api.stream(model, messages, temperature, 1.0, max_tokens, []):
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

    def monitor(run, seen):
        """Badge and figures of a run; the figures only when its metrics changed since this page last got them."""
        run = Path(run) if run else None
        key = ui_monitor.fingerprint(run)
        if key is not None and key == seen:
            return ui_monitor.badge(run), gr.skip(), gr.skip(), seen
        return *ui_monitor.snapshot(run), key

    with gr.Blocks(title="AEGIS", analytics_enabled=False) as demo:
        gr.Markdown("# AEGIS\nsouled Japanese chat · OpenAI protocol", elem_id="aegis-title")
        convo = gr.State(Conversation())
        with gr.Row(elem_id="top-row"):
            model = gr.Dropdown(label="model", choices=[], scale=3, min_width=200, elem_id="model-picker")
            reload_btn = gr.Button("⟳ models", scale=1, min_width=100, variant="secondary")
            api_status = gr.Markdown(status_html(f"connecting to {api.base_url}…", None), elem_id="api-status")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chatbot = gr.Chatbot(label="chat", show_label=False, height=430, elem_id="chatbot",
                                     render_markdown=False, sanitize_html=True, buttons=[], feedback_options=None)
                with gr.Row(elem_id="chat-row"):
                    msg = gr.Textbox(placeholder="メッセージを入力… (Enter で送信)", show_label=False, scale=5,
                                     min_width=200, elem_id="chat-input", label="message")
                    send_btn = gr.Button("send", variant="primary", scale=1, min_width=70, elem_id="chat-send")
                    stop_btn = gr.Button("stop", variant="stop", scale=1, min_width=70, interactive=False,
                                         elem_id="chat-stop")
                    clear = gr.Button("clear", variant="secondary", scale=1, min_width=70, elem_id="chat-clear")
                    retry_btn = gr.Button("retry", variant="secondary", scale=1, min_width=70, elem_id="chat-retry")
                with gr.Accordion("settings", open=False, elem_id="chat-settings"):
                    system = gr.Textbox(label="system prompt", value=DEFAULT_SYSTEM, lines=2)
                    with gr.Row():
                        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature")
                        top_p = gr.Slider(0.0, 1.0, value=0.95, step=0.01, label="top-p")
                        max_tokens = gr.Slider(1, max_tokens_limit(None), value=256, step=1,
                                               label="max tokens", info="up to half the model's context")
                    stop = gr.Textbox(label="stop sequences (one per line, up to 4; \\n for a line break)", lines=2)
            with gr.Tab("Soul monitor", id="monitor"):
                if runs is None:
                    gr.Markdown("start the UI with `--runs DIR` to watch the training runs under DIR")
                with gr.Row():
                    run_dd = gr.Dropdown(label="run", choices=run_choices(), scale=4, min_width=200,
                                         elem_id="run-picker")
                    runs_btn = gr.Button("⟳ runs", scale=1, min_width=100, variant="secondary")
                    live = gr.Checkbox(value=True, label="live (refresh every 2 s)", scale=1, min_width=150)
                badge = gr.Markdown(elem_id="soul-badge")
                about = ("the run's loss, α with the φ line, the gate with σ(φ), the orthogonality error and tokens/s "
                         "by step (the badge above has the latest values)")
                # no floating label: it covered the first panel's title (the figures carry their own titles)
                plot = gr.Image(label="soul metrics", show_label=False, type="pil", interactive=False,
                                elem_id="soul-plot", buttons=[], alt_text=about)
                plot_tall = gr.Image(label="soul metrics", show_label=False, type="pil", interactive=False,
                                     elem_id="soul-plot-tall", buttons=[], alt_text=about)
                timer = gr.Timer(2.0)
                drawn = gr.State(None)  # the fingerprint of the run whose figures this page shows
            with gr.Tab("Compare", id="compare"):
                cmp_prompt = gr.Textbox(label="prompt", lines=2, elem_id="compare-prompt")
                with gr.Row():
                    cmp_temp = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature")
                    cmp_max = gr.Slider(1, max_tokens_limit(None), value=200, step=1, label="max tokens")
                    cmp_btn = gr.Button("compare", variant="primary", elem_id="compare-run")
                with gr.Row():
                    with gr.Column():
                        model_a = gr.Dropdown(label="model A", choices=[], elem_id="model-a")
                        out_a = gr.Textbox(label="A", lines=12, interactive=False, elem_id="compare-a")
                    with gr.Column():
                        model_b = gr.Dropdown(label="model B", choices=[], elem_id="model-b")
                        out_b = gr.Textbox(label="B", lines=12, interactive=False, elem_id="compare-b")

        pickers = [model, model_a, model_b, api_status]
        demo.load(refresh_models, inputs=[model], outputs=pickers)
        reload_btn.click(refresh_models, inputs=[model], outputs=pickers)
        model.change(bound_tokens, [max_tokens, model], max_tokens, queue=False)
        for picker in (model_a, model_b):
            picker.change(bound_tokens, [cmp_max, model_a, model_b], cmp_max, queue=False)

        settings = [convo, model, system, temperature, top_p, max_tokens, stop]
        # after a run, the whole log once more (a plain value, not a stream's change): a send in the moment a reply
        # ended could leave the streamed log behind the conversation
        settle = dict(fn=lambda c: gr.skip() if c.busy else c.render(), inputs=convo, outputs=chatbot, queue=False,
                      show_progress="hidden")
        # one run per send ("multiple": the default drops a run while one is pending), no limit across sessions
        # (the API's own queue bounds the work)
        answer = dict(fn=drain, inputs=settings, outputs=[chatbot, api_status, stop_btn], show_progress="hidden",
                      trigger_mode="multiple", concurrency_limit=None)
        for trigger in (msg.submit, send_btn.click):
            # every press counts (the default drops a press while the last one is in flight, and the text with it)
            trigger(send, [msg, convo], [msg, chatbot], queue=False, show_progress="hidden",
                    trigger_mode="multiple").then(**answer).then(**settle)
        stop_btn.click(stop_reply, convo, None, queue=False)
        for cleared in (clear.click, chatbot.clear):  # the log's own trash button clears the conversation too
            cleared(clear_chat, convo, [chatbot, api_status, stop_btn], queue=False)
        retry_btn.click(retry, convo, chatbot, queue=False).then(**answer).then(**settle)
        cmp_btn.click(compare_side, [cmp_prompt, model_a, system, cmp_temp, cmp_max], out_a)
        cmp_btn.click(compare_side, [cmp_prompt, model_b, system, cmp_temp, cmp_max], out_b)
        runs_btn.click(refresh_runs, [run_dd], run_dd)
        shown = [badge, plot, plot_tall, drawn]
        run_dd.change(monitor, [run_dd, drawn], shown)
        demo.load(monitor, [run_dd, drawn], shown)
        timer.tick(monitor, [run_dd, drawn], shown, show_progress="hidden")
        live.change(lambda on: gr.Timer(active=on), live, timer)
    return demo


async def _read(api: Api, pieces: asyncio.Queue, *request) -> None:
    """Read one reply onto pieces, ending with ("end" | "error" | "stopped", detail). It runs as its own task so that
    stop and clear can cancel it: the cancel closes the HTTP stream, which is what ends the generation on the
    server."""
    try:
        async for piece in api.stream(*request):
            pieces.put_nowait(("piece", piece))
        pieces.put_nowait(("end", None))
    except UIError as e:
        pieces.put_nowait(("error", str(e)))
    except asyncio.CancelledError:
        pieces.put_nowait(("stopped", None))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m serve.ui", description=__doc__.splitlines()[0])
    ap.add_argument("--api", default="http://127.0.0.1:8000/v1", help="base URL of an OpenAI-compatible API")
    ap.add_argument("--api-key", default=None, help="key for the API (default: $AEGIS_API_KEY, else none)")
    ap.add_argument("--runs", type=Path, default=None, help="directory with training runs for the Soul monitor")
    ap.add_argument("--base", default="base", help="name of the served untrained base model, offered only in "
                    "Compare (default: base)")
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
    from .ui_theme import CSS, STATIC, PagePolicy, theme

    key = args.api_key if args.api_key is not None else os.environ.get("AEGIS_API_KEY")
    demo = build(Api(args.api.rstrip("/"), key, args.base), args.runs)
    demo.queue(default_concurrency_limit=8)
    from starlette.middleware import Middleware

    demo.launch(server_name=args.host, server_port=args.port, theme=theme(), css=CSS, ssr_mode=False,
                footer_links=[], show_error=True, quiet=False, allowed_paths=[str(STATIC)],
                app_kwargs={"middleware": [Middleware(PagePolicy)]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
