"""Which characters of a rendered chat are the assistant's turns: a chat trains only on those tokens (train/data.py
tokenizes the texts and labels the tokens inside the spans)."""

from __future__ import annotations


def assistant_spans(tokenizer, messages: list[dict]) -> list[tuple[str, list[tuple[int, int]]]] | None:
    """The rendered chat and the character spans of each assistant turn (its content and end-of-turn marker).
    Most templates render a conversation as a prefix of its continuation, so one text holds every turn. Some do not
    (Mistral v0.3's puts the system prompt into the last user turn, wherever that is): then each assistant turn is
    its own text, the conversation up to that turn, with that turn alone trained on. None when a turn cannot be
    told apart from the prompt before it."""

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True) if i else render([], True)
        upto = render(messages[: i + 1], False)
        if not full.startswith(prefix):
            return _turn_by_turn(render, messages)
        end = len(full)
        if i < len(messages) - 1:
            # `upto` may close the conversation (Phi-3 appends EOS); that closing text is not part of the turn
            closing = tokenizer.eos_token if tokenizer.eos_token and upto.endswith(tokenizer.eos_token) else ""
            end = min(len(_common_prefix(upto, full)), len(upto) - len(closing))
        spans.append((len(prefix), end))
    return [(full, spans)]


def _turn_by_turn(render, messages: list[dict]) -> list[tuple[str, list[tuple[int, int]]]] | None:
    """One text per assistant turn: the prompt the model is given when asked for that turn, then the turn as the
    template writes it (found after the same conversation rendered without its system prompt, where the template
    drops the system prompt from a conversation that does not end on a user turn)."""
    out = []
    system = 1 if messages and messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        base = next((b for b in (prompt, render(messages[system:i], True)) if upto.startswith(b)), None)
        if base is None:
            return None
        out.append((prompt + upto[len(base) :], [(len(prompt), len(prompt) + len(upto) - len(base))]))
    return out


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
