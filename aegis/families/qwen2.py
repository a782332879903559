"""Qwen2 (and Qwen2.5): q/k/v projections with biases, rotary halves as llama.cpp's qwen2 graph reads them, the
ChatML chat format (a default system prompt when the chat has none) and Hermes-style <tool_call> tool calls. LoRA
adapts the attention and the MLP projections."""

import re

from aegis.families import Family, register
from aegis.families._ollama import Facts, Template, wrapped

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MARKERS = ("<|im_start|>", "<|im_end|>")


def _default_system(facts: Facts) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (Qwen's and SmolLM's do)."""
    m = re.search(
        r"<\|im_start\|>system\n(.*?)<\|im_end\|>", facts.render([{"role": "user", "content": "x"}]) or "", re.DOTALL
    )
    return m.group(1) if m else None


def ollama(facts: Facts) -> list[Template]:
    """ChatML in Ollama's template, with the chat template's default system prompt (when it has one) or without:
    with or without a literal BOS, an empty system message printed or skipped."""
    if not facts.has(*MARKERS):
        return []
    return wrapped(
        facts,
        "ChatML",
        "<|im_start|>{role}\n",
        "<|im_end|>\n",
        "<|im_start|>assistant\n",
        ("<|im_end|>", "<|im_start|>"),
        default_system=_default_system(facts),
    )


FAMILY = register(
    Family(
        name="qwen2",
        gguf_arch="qwen2",
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        chat_template=CHAT_TEMPLATE,
        chat_markers=MARKERS,
        end_of_turn=("<|im_end|>", "<|endoftext|>"),
        ollama_format="ChatML (default system prompt)",
        ollama=ollama,
        tools="hermes",
        bpe_pre="qwen2",
    )
)
