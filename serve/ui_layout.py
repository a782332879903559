"""The chat page itself: its model picker and status line over the Chat, Soul monitor and Compare tabs, laid out,
with the pickers that follow /v1/models and the handlers they call, and their events wired. serve/ui.py launches it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from .ui_api import Api, Model, UIError

DEFAULT_SYSTEM = "あなたは親切で正確な日本語アシスタントです。"


def label(m: Model) -> str:
    return f"{m.id} · untrained base" if m.base else f"{m.id} · trained"


def max_tokens_limit(context: int | None) -> int:
    """The largest max_tokens the slider offers: half the model's context, the other half left for the chat."""
    return max(16, (context or 2048) // 2)


class Pickers:
    """The model pickers (Chat's and Compare's two) filled from /v1/models, and the max-tokens sliders bounded by
    the chosen models' contexts."""

    def __init__(self, api: Api):
        self.api = api
        self.contexts: dict[str, int | None] = {}

    async def refresh(self, current=None):
        import gradio as gr

        from .ui_chat import status_html

        try:
            models = await self.api.models()
        except UIError as e:
            none = gr.update(choices=[], value=None)
            return none, none, none, status_html(str(e), False)
        self.contexts.update({m.id: m.context for m in models})
        trained = [m for m in models if not m.base]
        chat = [(label(m), m.id) for m in (trained or models)]
        every = [(label(m), m.id) for m in models]
        ids = [c[1] for c in chat]
        pick = current if current in ids else (ids[0] if ids else None)
        base = next((m.id for m in models if m.base), None)
        a = base or (models[0].id if models else None)
        b = next((m.id for m in trained if m.id != a), a)
        note = f"connected to {self.api.base_url}: {len(models)} model(s)"
        return (
            gr.update(choices=chat, value=pick),
            gr.update(choices=every, value=a),
            gr.update(choices=every, value=b),
            status_html(note, True),
        )

    def bound_tokens(self, value, *models):
        import gradio as gr

        known = [self.contexts.get(m) for m in models if m]
        limit = min(max_tokens_limit(c) for c in known) if known else max_tokens_limit(None)
        return gr.update(maximum=limit, value=min(int(value or 1), limit))


def compare_side(api: Api):
    """The handler of one side of Compare: the prompt to that side's model, streamed into its box."""

    async def side(prompt, model, system, temperature, max_tokens):
        if not (prompt or "").strip():
            yield ""
            return
        messages = [{"role": "system", "content": system}] if (system or "").strip() else []
        messages.append({"role": "user", "content": prompt})
        text = ""
        try:
            async for piece in api.stream(model, messages, temperature, 1.0, max_tokens, []):
                text += piece
                yield text
        except UIError as e:
            yield f"{text}\n\n✖ {e}" if text else f"✖ {e}"

    return side


# ---- the page -------------------------------------------------------------------------------------------------------


def build(api: Api, runs: Path | None):
    """The page: the model picker and status line over three tabs, laid out, then their events wired."""
    import gradio as gr

    from .ui_chat import Conversation, status_html
    from .ui_monitor import Monitor

    with gr.Blocks(title="AEGIS", analytics_enabled=False) as demo:
        gr.Markdown("# AEGIS\nsouled Japanese chat · OpenAI protocol", elem_id="aegis-title")
        page = SimpleNamespace(convo=gr.State(Conversation()))
        with gr.Row(elem_id="top-row"):
            page.model = gr.Dropdown(label="model", choices=[], scale=3, min_width=200, elem_id="model-picker")
            page.reload_btn = gr.Button("⟳ models", scale=1, min_width=100, variant="secondary")
            connecting = status_html(f"connecting to {api.base_url}…", None)
            page.api_status = gr.Markdown(connecting, elem_id="api-status")
        monitor = Monitor(runs)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                _chat_tab(page)
            with gr.Tab("Soul monitor", id="monitor"):
                monitor.tab(page)
            with gr.Tab("Compare", id="compare"):
                _compare_tab(page)
        _wire_chat(page, api)
        _wire_models_and_compare(page, api, demo)
        monitor.wire(page, demo)
    return demo


def _chat_tab(page: SimpleNamespace) -> None:
    import gradio as gr

    page.chatbot = gr.Chatbot(
        label="chat",
        show_label=False,
        height=430,
        elem_id="chatbot",
        render_markdown=False,
        sanitize_html=True,
        buttons=[],
        feedback_options=None,
    )
    with gr.Row(elem_id="chat-row"):
        page.msg = gr.Textbox(
            placeholder="メッセージを入力… (Enter で送信)",
            show_label=False,
            scale=5,
            min_width=200,
            elem_id="chat-input",
            label="message",
        )
        page.send_btn = gr.Button("send", variant="primary", scale=1, min_width=70, elem_id="chat-send")
        page.stop_btn = gr.Button("stop", variant="stop", scale=1, min_width=70, interactive=False, elem_id="chat-stop")
        page.clear = gr.Button("clear", variant="secondary", scale=1, min_width=70, elem_id="chat-clear")
        page.retry_btn = gr.Button("retry", variant="secondary", scale=1, min_width=70, elem_id="chat-retry")
    with gr.Accordion("settings", open=False, elem_id="chat-settings"):
        page.system = gr.Textbox(label="system prompt", value=DEFAULT_SYSTEM, lines=2)
        with gr.Row():
            page.temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature")
            page.top_p = gr.Slider(0.0, 1.0, value=0.95, step=0.01, label="top-p")
            page.max_tokens = gr.Slider(
                1, max_tokens_limit(None), value=256, step=1, label="max tokens", info="up to half the model's context"
            )
        page.stop = gr.Textbox(label="stop sequences (one per line, up to 4; \\n for a line break)", lines=2)


def _compare_tab(page: SimpleNamespace) -> None:
    import gradio as gr

    page.cmp_prompt = gr.Textbox(label="prompt", lines=2, elem_id="compare-prompt")
    with gr.Row():
        page.cmp_temp = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature")
        page.cmp_max = gr.Slider(1, max_tokens_limit(None), value=200, step=1, label="max tokens")
        page.cmp_btn = gr.Button("compare", variant="primary", elem_id="compare-run")
    with gr.Row():
        with gr.Column():
            page.model_a = gr.Dropdown(label="model A", choices=[], elem_id="model-a")
            page.out_a = gr.Textbox(label="A", lines=12, interactive=False, elem_id="compare-a")
        with gr.Column():
            page.model_b = gr.Dropdown(label="model B", choices=[], elem_id="model-b")
            page.out_b = gr.Textbox(label="B", lines=12, interactive=False, elem_id="compare-b")


def _wire_chat(page: SimpleNamespace, api: Api) -> None:
    import gradio as gr

    from .ui_chat import Chat

    chat = Chat(api)
    log = [page.chatbot, page.api_status, page.stop_btn]
    settings = [page.convo, page.model, page.system, page.temperature, page.top_p, page.max_tokens, page.stop]
    # after a run, the whole log once more (a plain value, not a stream's change): a send or clear in the moment a
    # run ends can leave the streamed log behind the conversation
    settle = dict(
        fn=lambda c: gr.skip() if c.busy else c.render(),
        inputs=page.convo,
        outputs=page.chatbot,
        queue=False,
        show_progress="hidden",
    )
    # one run per send ("multiple": the default drops a run while one is pending), no limit across sessions (the
    # API's own queue bounds the work)
    answer = dict(
        fn=chat.drain,
        inputs=settings,
        outputs=log,
        show_progress="hidden",
        trigger_mode="multiple",
        concurrency_limit=None,
    )
    for trigger in (page.msg.submit, page.send_btn.click):
        # every press counts (the default drops a press while the last one is in flight, and the text with it)
        trigger(
            chat.send,
            [page.msg, page.convo],
            [page.msg, page.chatbot],
            queue=False,
            show_progress="hidden",
            trigger_mode="multiple",
        ).then(**answer).then(**settle)
    page.stop_btn.click(chat.stop, page.convo, None, queue=False)
    for cleared in (page.clear.click, page.chatbot.clear):  # the log's own trash button clears the conversation too
        cleared(chat.clear, page.convo, log, queue=False)
    page.retry_btn.click(chat.retry, page.convo, page.chatbot, queue=False).then(**answer).then(**settle)


def _wire_models_and_compare(page: SimpleNamespace, api: Api, demo) -> None:
    pickers = Pickers(api)
    shown = [page.model, page.model_a, page.model_b, page.api_status]
    demo.load(pickers.refresh, inputs=[page.model], outputs=shown)
    page.reload_btn.click(pickers.refresh, inputs=[page.model], outputs=shown)
    page.model.change(pickers.bound_tokens, [page.max_tokens, page.model], page.max_tokens, queue=False)
    for picker in (page.model_a, page.model_b):
        picker.change(pickers.bound_tokens, [page.cmp_max, page.model_a, page.model_b], page.cmp_max, queue=False)
    side = compare_side(api)
    page.cmp_btn.click(side, [page.cmp_prompt, page.model_a, page.system, page.cmp_temp, page.cmp_max], page.out_a)
    page.cmp_btn.click(side, [page.cmp_prompt, page.model_b, page.system, page.cmp_temp, page.cmp_max], page.out_b)
