"""Phi-3 (and Phi-3.5, Phi-4-mini): the family of AEGIS's own tiny model. Fused qkv and gate_up projections, LongRoPE,
the <|system|>/<|user|>/<|assistant|> ... <|end|> chat format; no tool format of its own, so AEGIS's JSON one."""

from aegis.families import Family, register

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

FAMILY = register(Family(
    name="phi3", gguf_arch="phi3", lora_targets=("qkv_proj", "o_proj"), chat_template=CHAT_TEMPLATE,
    chat_markers=("<|user|>", "<|assistant|>", "<|end|>"),
    # a small model that forgets <|end|> goes on to write the next turn itself: its markers stop the reply too
    end_of_turn=("<|end|>", "<|endoftext|>", "<|assistant|>", "<|user|>", "<|system|>"),
    ollama_format="Phi-3", tools="json", longrope=True))
