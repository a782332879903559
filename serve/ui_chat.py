"""The Chat tab: one browser session's conversation and the handlers of its buttons.

Sends only append to the conversation; one answering loop per session (`Chat.drain`) answers the queued messages in
order, so a message sent while a reply is coming is queued, never lost or sent twice."""

from __future__ import annotations

import asyncio
import html
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import gradio as gr

from .ui_api import Api, UIError, parse_stops

NOTES = {
    "queued": "⏳ queued: sent when the reply above ends",
    "stopped": "⏹ stopped",
    "failed": "✖ not answered (see the status line): press retry to send it again",
    "cut": "✖ cut short by an error (see the status line)",
}


def status_html(text: str, ok: bool | None) -> str:
    """The status line: ok, an error, or (None) waiting for the API's first answer."""
    kind, mark = {True: ("api-ok", "●"), False: ("api-error", "✖"), None: ("api-wait", "○")}[ok]
    # a <div> is an HTML block to the Markdown component: its text is not read as markdown, so escaping is enough
    return f'<div class="{kind}" role="status">{mark} {html.escape(text)}</div>'


@dataclass(eq=False)  # a turn is found by identity: the same text sent twice is two turns
class Turn:
    role: str  # user | assistant
    text: str
    state: str = "sent"  # user: queued | sent | failed; assistant: writing | sent | stopped | cut


@dataclass
class Conversation:
    """One browser session's chat."""

    turns: list[Turn] = field(default_factory=list)
    busy: bool = False  # an answering loop is running
    reader: asyncio.Task | None = None  # reading the reply now being written
    era: int = 0  # bumped by clear: a reply of an earlier era is dropped

    def __deepcopy__(self, memo):  # gr.State copies its default for each session: each starts empty
        return Conversation()

    def queued(self) -> list[Turn]:
        return [t for t in self.turns if t.role == "user" and t.state == "queued"]

    def context(self, upto: Turn) -> list[dict]:
        """The chat so far as API messages: answered turns only (a failed message is not part of it)."""
        out = []
        for t in self.turns[: self.turns.index(upto)]:
            if (t.role == "user" and t.state == "sent") or (t.role == "assistant" and t.text):
                out.append({"role": t.role, "content": t.text})
        return out + [{"role": "user", "content": upto.text}]

    def start(self, turn: Turn) -> Turn:
        """Mark a queued message sent and add the reply being written after it."""
        turn.state = "sent"
        reply = Turn("assistant", "", "writing")
        self.turns.insert(self.turns.index(turn) + 1, reply)
        return reply

    def finish(self, turn: Turn, reply: Turn, kind: str, error: str | None) -> bool:
        """Settle a reply that ended ("end" | "stopped" | "error"); False where it failed. A failed message with no
        reply text is marked for retry and the empty reply goes."""
        reply.state = "stopped" if kind == "stopped" else "sent"
        if kind != "error":
            return True
        if reply.text:
            reply.state = "cut"
        else:
            self.turns.remove(reply)
            turn.state = "failed"
        return False

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


class Chat:
    """The Chat tab's handlers, for every session (each passes its own Conversation)."""

    def __init__(self, api: Api):
        self.api = api

    async def send(self, message, convo: Conversation):
        """Queue a message: the box empties (only here, never while a reply streams) and the bubble shows."""
        if not (message or "").strip():
            return gr.skip(), gr.skip()
        convo.turns.append(Turn("user", message, "queued"))
        # while a reply streams, only its run writes the log (Gradio streams it as changes to what that run sent
        # last, so a second writer would garble it); the queued bubble shows with its next update
        return "", gr.skip() if convo.busy else convo.render()

    async def drain(self, convo: Conversation, model, system, temperature, top_p, max_tokens, stop):
        """Answer the queued messages in order, one loop per session: every send starts one; a later one waits
        until the running loop ends, then answers what it left. A loop takes no new message once it has said it is
        done (that message's own run answers it), so its last word is always its last update.

        Gradio streams a run's updates as changes to what it sent last, and the page applies a change to that same
        object in place, so an update the page has not drawn yet can lose a property (a bare update after
        `interactive=True` deletes it). While a run writes, each update therefore sends the status and the stop
        button whole, the same as before unless they change."""
        while convo.busy:
            await asyncio.sleep(0.05)
        if not convo.queued():
            yield gr.skip(), gr.skip(), gr.skip()
            return
        convo.busy = True
        try:
            while True:
                turn = convo.queued()[0]
                messages = [{"role": "system", "content": system}] if (system or "").strip() else []
                request = (model, messages + convo.context(turn), temperature, top_p, max_tokens, parse_stops(stop))
                reply, era = convo.start(turn), convo.era
                waiting = len(convo.queued())
                busy = status_html(f"{model}: generating…" + (f" ({waiting} queued)" if waiting else ""), True)
                yield convo.render(), busy, gr.update(interactive=True)
                last = ("stopped", None)
                async for last in self._reply(convo, reply, era, request):
                    if last[0] == "piece":
                        yield convo.render(), busy, gr.update(interactive=True)
                if convo.era != era:  # cleared meanwhile: nothing of this reply is kept
                    break
                kind, value = last
                status = self._status(convo, model, kind, value, convo.finish(turn, reply, kind, value))
                if not convo.queued():  # the last word while still busy: a later run waits for it
                    yield convo.render(), status, gr.update(interactive=False)
                    break
                yield convo.render(), status, gr.update(interactive=True)
        finally:
            convo.busy = False
            convo.cancel()

    async def _reply(
        self, convo: Conversation, reply: Turn, era: int, request: tuple
    ) -> AsyncIterator[tuple[str, str | None]]:
        """Read one reply into reply.text: ("piece", None) after each batch of pieces (what came meanwhile goes out
        in one update), then ("end" | "stopped" | "error", detail) once it ends. A clear (a new era) ends it at
        once, with nothing more."""
        pieces = asyncio.Queue()
        if convo.era != era:  # cleared while the reply's first update was on its way
            return
        reader = asyncio.create_task(_read(self.api, pieces, *request))
        # a reader cancelled before its first step never reaches its own except: say "stopped" for it
        reader.add_done_callback(lambda t: t.cancelled() and pieces.put_nowait(("stopped", None)))
        convo.reader = reader
        try:
            while True:
                kind, value = await pieces.get()
                while kind == "piece" and not pieces.empty():
                    reply.text += value
                    kind, value = pieces.get_nowait()
                if convo.era != era:
                    return
                if kind != "piece":
                    yield kind, value
                    return
                reply.text += value
                yield "piece", None
        finally:
            convo.reader = None

    @staticmethod
    def _status(convo: Conversation, model: str, kind: str, error: str | None, ok: bool) -> str:
        if not ok:
            return status_html(error or "the reply failed", False)
        if kind == "stopped":
            return status_html(f"{model}: stopped", True)
        turns = sum(1 for t in convo.turns if t.role == "assistant")
        return status_html(f"{model}: done · {turns} turn(s)", True)

    async def stop(self, convo: Conversation):
        convo.cancel()

    async def clear(self, convo: Conversation):
        convo.era += 1
        convo.cancel()
        convo.turns.clear()
        return [], status_html("cleared", True), gr.update(interactive=False)

    async def retry(self, convo: Conversation):
        failed = [t for t in convo.turns if t.role == "user" and t.state == "failed"]
        for t in failed:  # to the end of the chat, queued again: one bubble each, as before
            convo.turns.remove(t)
            t.state = "queued"
            convo.turns.append(t)
        return gr.skip() if convo.busy else convo.render()


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
