"""Mistral: written as llama.cpp's llama architecture (q/k rows interleaved), the [INST] chat format (v0.3's: the
system prompt opens the last user turn) that ends a reply with the tokenizer's EOS; calls in Mistral's own tool format
(aegis/tool_format.py `mistral`: [AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS])."""

from aegis.families import register
from aegis.families._llama_arch import llama_arch
from aegis.families._ollama import Facts, Template
from aegis.tool_format import ToolFormat

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for message in turns %}{% if message['role'] == 'user' %}"
    "{% if loop.last and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def _go(bos: str, eos: str, close: str, space: str, tools: ToolFormat) -> str:
    """[INST] turns in Ollama's template. The system prompt, and after it the tools on offer, open the last turn
    when it is the user's (a tool's result included: the server writes it as a user turn); an assistant turn is its
    text, or its text and its calls, then EOS."""
    system = (
        '{{ if and $last (or (eq $first.Role "system") $.Tools) }}'
        '{{ if eq $first.Role "system" }}{{ $first.Content }}{{ end }}'
        '{{ if and $.Tools (eq $first.Role "system") $first.Content }}\n\n{{ end }}'
        "{{ if $.Tools }}" + tools.go_tools + "{{ end }}\n\n{{ end }}"
    )
    user = '{{ if eq .Role "tool" }}' + tools.go_result + "{{ else }}{{ .Content }}{{ end }}"
    assistant = (
        "{{ if .ToolCalls }}{{ if .Content }}{{ .Content }}\n{{ end }}"
        + tools.go_calls
        + "{{ else }}{{ .Content }}{{ end }}"
    )
    return (
        bos + "{{ $first := index .Messages 0 }}{{ range $i, $m := .Messages }}"
        "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if or (eq .Role "user") (eq .Role "tool") }}[INST] '
        + system
        + user
        + close
        + '{{ else if eq .Role "assistant" }}'
        + space
        + assistant
        + eos
        + "{{ end }}{{ end }}"
    )


def ollama(facts: Facts) -> list[Template]:
    """Mistral's [INST] turns (v0.3's; v0.1's, which refuses system messages, renders the same), for a vocabulary
    with BOS and EOS: with or without a literal BOS, "[/INST]" or " [/INST]", a space before a reply or none."""
    if not (facts.bos and facts.eos):
        return []
    return [
        Template("Mistral [INST]", _go(bos, facts.eos, close, space, facts.tools), ("[INST]", "[/INST]"))
        for bos in facts.boses
        for close in ("[/INST]", " [/INST]")
        for space in (" ", "")
    ]


FAMILY = register(
    llama_arch(
        name="mistral",
        chat_template=CHAT_TEMPLATE,
        chat_markers=("[INST]", "[/INST]"),
        end_of_turn=(),
        ollama_format="Mistral [INST]",
        ollama=ollama,
        tools="mistral",
    )
)
