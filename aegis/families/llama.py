"""Llama (Llama 3 and the models built on its architecture, e.g. SmolLM): separate q/k/v projections whose rows
llama.cpp's llama graph wants interleaved, the Llama 3 header chat format; calls in Llama 3.1's own tool format
(aegis/tool_format.py `llama3`: a JSON object {"name", "parameters"}, results in the ipython role, a turn that ends in
<|eot_id|> or, after a call, <|eom_id|>)."""

from aegis.families import register
from aegis.families._llama_arch import llama_arch
from aegis.families._ollama import Facts, Template, wrapped

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
OLLAMA_FORMAT = "Llama 3"


def ollama(facts: Facts) -> list[Template]:
    """Llama 3's header turns in Ollama's template: with or without a literal BOS, an empty system message printed
    or skipped."""
    if not facts.has(*MARKERS):
        return []
    return wrapped(
        facts,
        OLLAMA_FORMAT,
        "<|start_header_id|>{role}<|end_header_id|>\n\n",
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    )


FAMILY = register(
    llama_arch(
        name="llama",
        chat_template=CHAT_TEMPLATE,
        chat_markers=MARKERS,
        end_of_turn=("<|eot_id|>", "<|eom_id|>"),
        ollama_format=OLLAMA_FORMAT,
        ollama=ollama,
        tools="llama3",
    )
)
