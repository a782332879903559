"""Phi-3 (and Phi-3.5, Phi-4-mini): the family of AEGIS's own tiny model. Fused qkv and gate_up projections, LongRoPE,
the <|system|>/<|user|>/<|assistant|> ... <|end|> chat format; no tool format of its own, so AEGIS's JSON one."""

from aegis.families import Family, register
from aegis.families._ollama import Facts, Template, wrapped

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

MARKERS = ("<|user|>", "<|assistant|>", "<|end|>")
# a small model that forgets <|end|> goes on to write the next turn itself: its markers stop the reply too
END_OF_TURN = ("<|end|>", "<|endoftext|>", "<|assistant|>", "<|user|>", "<|system|>")


def ollama(facts: Facts) -> list[Template]:
    """Phi-3's turns in Ollama's template: with or without a literal BOS, an empty system message skipped or
    printed."""
    if not facts.has(*MARKERS):
        return []
    return wrapped(facts, "Phi-3", "<|{role}|>\n", "<|end|>\n", "<|assistant|>\n", END_OF_TURN, skips=(True, False))


FAMILY = register(
    Family(
        name="phi3",
        gguf_arch="phi3",
        lora_targets=("qkv_proj", "o_proj"),
        chat_template=CHAT_TEMPLATE,
        chat_markers=MARKERS,
        end_of_turn=END_OF_TURN,
        ollama_format="Phi-3",
        ollama=ollama,
        tools="json",
        longrope=True,
    )
)
