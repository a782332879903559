"""What a family's Ollama Modelfile template is built from: the facts a tokenizer gives (`Facts`), the template and
stops a family offers for them (`Template`), and the Go template of the formats that wrap each message in an
opening and a closing text (`turns`: Phi-3, ChatML, Llama 3) with its variants for a tokenizer (`wrapped`). Each
family file builds its own templates from these (`Family.ollama`); export proves them against the tokenizer's chat
template (export/chat_formats.py).

Ollama renders a chat with a Go template over .Messages (the system, user, assistant and tool messages in order) and
.Tools (the request's tools); every character of a template here is one the chat renders: no cosmetic newlines, no
trim markers."""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass

from aegis.tool_format import ToolFormat


@dataclass(frozen=True)
class Facts:
    """What a tokenizer gives a family's Modelfile templates."""

    vocab: Container[str]  # its tokens' texts
    bos: str  # the BOS token's text ("" when none)
    eos: str  # the EOS token's text ("" when none)
    render: Callable[[list[dict]], str | None]  # its chat template over messages (None: it refuses them)
    tools: ToolFormat  # the tool format the server uses for this chat template

    def has(self, *tokens: str) -> bool:
        return all(t in self.vocab for t in tokens)

    @property
    def boses(self) -> list[str]:
        """A template without a literal BOS first (the runtime adds it), then with one."""
        return ["", self.bos] if self.bos else [""]


@dataclass
class Template:
    format: str  # the chat format's name, as export reports it (a family's `ollama_format` among them)
    template: str  # the Go template
    stops: tuple[str, ...]  # Ollama's stop parameters (export adds the model's EOS)


def turns(
    open_: str,
    close: str,
    gen: str,
    bos: str,
    skip_empty_system: bool,
    default_system: str | None,
    tools: ToolFormat | None = None,
) -> str:
    """Formats that wrap each message as open(role) + content + close, e.g. <|im_start|>user\\n...<|im_end|>\\n.
    With `tools`, Ollama's tools, calls and tool results are written in that tool format, as the server writes
    them: the tools' description in the system turn, calls in the assistant's, results in a turn of the format's
    result role."""
    described = open_.format(role="system") + (tools.go_tools if tools else "") + close
    system = (
        open_.format(role="system")
        + "{{ .Content }}"
        + (
            "{{ if and $.Tools (eq $i 0) }}{{ if .Content }}\n\n{{ end }}" + tools.go_tools + "{{ end }}"
            if tools
            else ""
        )
        + close
    )
    if skip_empty_system:
        system = (
            ("{{ if or .Content (and $.Tools (eq $i 0)) }}" if tools else "{{ if .Content }}") + system + "{{ end }}"
        )
    # a chat that does not open with a system message: the tools' description is its system turn (the server
    # inserts one), else the template's default system prompt, if it has one
    first = '{{ if and (eq $i 0) (ne .Role "system") }}'
    default = first + open_.format(role="system") + default_system + close + "{{ end }}" if default_system else ""
    if tools and default:
        default = first + "{{ if $.Tools }}" + described + "{{ else }}" + default[len(first) :] + "{{ end }}"
    elif tools:
        default = '{{ if and $.Tools (eq $i 0) (ne .Role "system") }}' + described + "{{ end }}"
    return (
        bos
        + "{{ range $i, $m := .Messages }}"
        + default
        + '{{ if eq .Role "system" }}'
        + system
        + "{{ else }}"
        + _other(open_, close, tools)
        + "{{ end }}{{ end }}"
        + gen
    )


def _other(open_: str, close: str, tools: ToolFormat | None) -> str:
    """A turn that is not the system's: the message's role and content, or with `tools` a tool's result in the
    format's result role and an assistant's calls in its call format."""
    other = open_.format(role="{{ .Role }}") + "{{ .Content }}" + close
    if not tools:
        return other
    return (
        '{{ if eq .Role "tool" }}'
        + open_.format(role=tools.result_role)
        + tools.go_result
        + close
        + "{{ else if .ToolCalls }}"
        + open_.format(role="assistant")
        + "{{ if .Content }}{{ .Content }}\n{{ end }}"
        + tools.go_calls
        + close
        + "{{ else }}"
        + other
        + "{{ end }}"
    )


def wrapped(
    facts: Facts,
    format: str,
    open_: str,
    close: str,
    gen: str,
    stops: tuple[str, ...],
    skips: tuple[bool, ...] = (False, True),
    default_system: str | None = None,
) -> list[Template]:
    """The `turns` templates of a wrapping format for a tokenizer's facts: with or without a literal BOS, with the
    chat template's default system prompt (when it has one, named "FORMAT (default system prompt)") or without,
    an empty system message printed or skipped in the order of `skips`."""
    defaults = [default_system, None] if default_system is not None else [None]
    return [
        Template(
            format + (" (default system prompt)" if d is not None else ""),
            turns(open_, close, gen, bos, skip, d, facts.tools),
            stops,
        )
        for bos in facts.boses
        for d in defaults
        for skip in skips
    ]


def none(facts: Facts) -> list[Template]:
    """A family with no Ollama template of its own (its chat format is another family's, or unknown to Ollama)."""
    return []
