"""The Ollama TEMPLATE and stop parameters for a model's own chat format, proved equal to its chat template.

Ollama renders a chat with a Go template over .Messages (the system, user and assistant messages in order, with
consecutive messages of one role merged) and always asks for the assistant's turn next. The BOS token is not part of
the text: llama.cpp's tokenizer adds it when the GGUF says so (export writes add_bos_token as the HF tokenizer
behaves). The templates AEGIS writes are Go templates, each family's in its file (aegis/families/: Phi-3, Llama 3,
Mistral [INST], ChatML) and here those of the formats no family owns (Gemma, Llama 2 [INST]), each with the few
parameters its models vary (a default system prompt, whether an empty system message is printed, a literal BOS, the
spacing around [INST]).

A model's format is the first candidate whose template renders every conversation in PROOF to exactly the tokens
the tokenizer's own Jinja chat template (transformers' apply_chat_template) gives. When none does, ChatFormatError
shows where the closest candidate differs: nothing falls back silently."""

from __future__ import annotations

from dataclasses import dataclass, field

from aegis import families
from aegis.families._ollama import Facts, Template

from . import gotemplate
from .files import ExportError


def _m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# Conversations the template must render token for token: with and without a system prompt, an empty one, several
# turns, several lines; each ends with a user turn, and the generation prompt is always asked for (as Ollama does).
PROOF = [
    ("user", [_m("user", "日本の首都はどこですか？")]),
    ("system, user", [_m("system", "あなたは親切なアシスタントです。"), _m("user", "What is the capital of Japan?")]),
    (
        "user, assistant, user",
        [
            _m("user", "こんにちは"),
            _m("assistant", "こんにちは！何をお手伝いしましょうか。"),
            _m("user", "富士山の高さは？"),
        ],
    ),
    (
        "system and three turns",
        [
            _m("system", "Answer briefly."),
            _m("user", "1+1?"),
            _m("assistant", "2"),
            _m("user", "2+2?"),
            _m("assistant", "4"),
            _m("user", "3+3?"),
        ],
    ),
    ("empty system", [_m("system", ""), _m("user", "a")]),
    ("several lines", [_m("user", "複数行の\n\n質問です。\n- one\n- two")]),
]
# Whitespace around a message's content: kept exactly, or stripped by the chat template (Llama 2/3 and Gemma
# templates trim); Ollama's template language has no trim, so that difference is reported, never hidden.
EDGE = (
    "whitespace around content",
    [_m("user", "  leading and trailing spaces  "), _m("assistant", " b\n"), _m("user", "c\n")],
)


class ChatFormatError(ExportError):
    """The tokenizer's chat template matches none of the formats AEGIS can write for Ollama."""


@dataclass
class Proof:
    format: str
    template: str
    stops: list[str]
    conversations: list[dict] = field(default_factory=list)  # {name, tokens}
    tokenizers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    system: bool = True  # False: the chat template refuses system messages

    def summary(self) -> str:
        tokens = sum(c["tokens"] for c in self.conversations)
        return (
            f"chat template: {self.format}; the Modelfile template renders {len(self.conversations)} "
            f"conversations to the same {tokens} tokens as the tokenizer's chat template "
            f"(tokenized by {' and '.join(self.tokenizers)})"
        )

    def to_json(self) -> dict:
        return {
            "ok": True,
            "format": self.format,
            "stops": self.stops,
            "conversations": self.conversations,
            "tokenizers": self.tokenizers,
            "notes": self.notes,
            "system_messages": self.system,
        }


# ---- the formats ----------------------------------------------------------------------------------------------------
# Each family's own templates are in its file (aegis/families/, `Family.ollama`); here are those of the chat formats
# no registered family owns, which a model of a supported architecture may still ship.


def _gemma(bos: str) -> str:
    """Gemma has user and model turns only; a system message opens the first user turn (as Gemma 3's does)."""
    return (
        bos + "{{ $first := index .Messages 0 }}{{ range $i, $m := .Messages }}"
        '{{ if eq .Role "user" }}<start_of_turn>user\n{{ if and (eq $i 1) (eq $first.Role "system") }}'
        "{{ $first.Content }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
        '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
        "{{ end }}{{ end }}<start_of_turn>model\n"
    )


def _llama2(bos: str, bos_text: str, eos_text: str) -> str:
    """Llama 2: every user turn after the first starts with BOS; the system prompt sits in <<SYS>> inside the first."""
    return (
        bos + "{{ $first := index .Messages 0 }}{{ range $i, $m := .Messages }}"
        '{{ if eq .Role "user" }}{{ if gt $i 1 }}' + bos_text + "{{ end }}[INST] "
        '{{ if and (eq $i 1) (eq $first.Role "system") }}<<SYS>>\n{{ $first.Content }}\n<</SYS>>\n\n{{ end }}'
        '{{ .Content }} [/INST]{{ else if eq .Role "assistant" }} {{ .Content }} ' + eos_text + "{{ end }}{{ end }}"
    )


def _others(facts: Facts) -> list[Template]:
    out = []
    if facts.has("<start_of_turn>", "<end_of_turn>"):
        out += [Template("Gemma", _gemma(bos), ("<end_of_turn>", "<start_of_turn>")) for bos in facts.boses]
    if facts.bos and facts.eos:
        out += [
            Template("Llama 2 [INST]", _llama2(bos, facts.bos, facts.eos), ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"))
            for bos in facts.boses
        ]
    return out


def known_formats() -> list[str]:
    """The chat formats AEGIS can write for Ollama: every family's own, then the others'."""
    return list(
        dict.fromkeys([*(f.ollama_format for f in families.FAMILIES.values()), "ChatML", "Gemma", "Llama 2 [INST]"])
    )


def candidates(tok, render) -> list[Template]:
    """Every template AEGIS would write for this tokenizer: each registered family's (registry order), then the
    other formats'; `render(messages)` is the chat template's text (None if it refuses the conversation). Each
    writes tools in the tool format the server uses for this chat template (its family's)."""
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    facts = Facts(
        tok.get_vocab(),
        tok.bos_token or "",
        tok.eos_token or "",
        render,
        families.by_chat_template(template).tool_format,
    )
    out = [t for family in families.FAMILIES.values() for t in family.ollama(facts)] + _others(facts)
    for c in out:  # the model's own end-of-sequence token always stops a reply
        c.stops = tuple(dict.fromkeys([*c.stops, facts.eos] if facts.eos else c.stops))
    return out


# ---- the proof ------------------------------------------------------------------------------------------------------


def ollama_messages(messages: list[dict]) -> list[dict]:
    """The .Messages Ollama gives a template: consecutive messages of one role merged with a blank line; a message
    that called tools carries them (ToolCalls: Function.Name, Function.Arguments), a tool's result its ToolName."""
    out: list[dict] = []
    for m in messages:
        calls = [{"Function": {"Name": c["name"], "Arguments": c["arguments"]}} for c in m.get("tool_calls", [])]
        plain = not calls and m["role"] != "tool"
        if plain and out and out[-1]["Role"] == m["role"] and not out[-1]["ToolCalls"]:
            out[-1]["Content"] += "\n\n" + m["content"]
        else:
            out.append(
                {
                    "Role": m["role"],
                    "Content": m.get("content") or "",
                    "ToolCalls": calls,
                    "ToolName": m.get("tool_name", ""),
                }
            )
    return out


def render_go(template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    """tools: Ollama's request tools ({"type": "function", "function": {"name", "description", "parameters"}})."""
    shaped = [
        {
            "Type": t.get("type", "function"),
            "Function": {
                "Name": t["function"]["name"],
                "Description": t["function"].get("description", ""),
                "Parameters": t["function"].get("parameters"),
            },
        }
        for t in tools or []
    ]
    return gotemplate.render(template, {"Messages": ollama_messages(messages), "Tools": shaped})


def _hf_renderer(tok):
    import jinja2

    def render(messages):
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError:  # raise_exception() in the template: it refuses this conversation
            return None

    return render


def _difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    around = slice(max(0, i - 20), i + 30)
    return f"at character {i} the Modelfile renders {a[around]!r}, the chat template {b[around]!r}"


def _try(c: Template, tok, render, tokenizers: dict) -> tuple[list[dict], list[str], str | None, bool]:
    """(passed conversations, notes, first failure, system allowed) for one candidate."""
    hf_ids = lambda text: list(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    passed, notes, system = [], [], True
    for name, conv in [*PROOF, EDGE]:
        want = render(conv)
        if want is None:
            if any(m["role"] == "system" for m in conv):
                system = False
                continue
            return passed, notes, f"the chat template refuses the conversation '{name}'", system
        try:
            got = render_go(c.template, conv)
        except (gotemplate.TemplateError, IndexError) as e:
            return passed, notes, f"'{name}': the Go template fails ({e})", system
        ids = hf_ids(want)
        bad = [label for label, encode in tokenizers.items() if encode(got) != ids]
        if not bad:
            passed.append({"name": name, "tokens": len(ids)})
            continue
        if (name, conv) == EDGE:
            stripped = [_m(m["role"], m["content"].strip()) for m in conv]
            if render(stripped) == want and all(
                enc(render_go(c.template, stripped)) == ids for enc in tokenizers.values()
            ):
                notes.append(
                    "the chat template strips whitespace around message content; Ollama's template "
                    "language cannot, so a message that starts or ends with whitespace keeps it in Ollama"
                )
                continue
        return passed, notes, f"'{name}': {_difference(got, want)} (differs for: {', '.join(bad)})", system
    if not system:
        notes.append("the chat template refuses system messages: a Modelfile SYSTEM prompt is refused")
    return passed, notes, None, system


def derive(tok, where: str, tokenizers: dict | None = None) -> Proof:
    """The Ollama template, stops and proof for `tok`'s chat template. `tokenizers` maps a label to a function
    text -> ids that tokenizes Ollama's rendering as the runtime does (BOS per the vocabulary, special tokens
    parsed); the HF tokenizer is always one of them."""
    template = tok.chat_template
    if not template:
        raise ChatFormatError(
            f"{where}: the tokenizer has no chat template; the Modelfile's template is derived "
            f"from the model's own, so there is nothing to derive it from"
        )
    # The runtime adds BOS to the rendered text as a token, then tokenizes the text as following it (llama.cpp
    # does; export writes add_bos_token and add_space_prefix as the HF tokenizer behaves after special tokens).
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    prefix = tok.bos_token if adds_bos else ""
    tokenizers = {
        "the HF tokenizer": lambda text: list(tok(prefix + text, add_special_tokens=False)["input_ids"]),
        **(tokenizers or {}),
    }
    render = _hf_renderer(tok)
    best = None
    for c in candidates(tok, render):
        passed, notes, failure, system = _try(c, tok, render, tokenizers)
        if failure is None:
            return Proof(c.format, c.template, list(c.stops), passed, list(tokenizers), notes, system)
        if best is None or len(passed) > best[0]:
            best = (len(passed), c.format, failure)
    known = ", ".join(known_formats())
    closest = (
        f"; closest: {best[1]} ({best[0]} of {len(PROOF) + 1} conversations match; {best[2]})"
        if best
        else "; none of their turn markers is in the vocabulary"
    )
    raise ChatFormatError(
        f"{where}: no Ollama template AEGIS can write renders this chat template exactly (formats: {known}){closest}"
    )
