"""Qwen2 (and Qwen2.5): q/k/v projections with biases, rotary halves as llama.cpp's qwen2 graph reads them, the
ChatML chat format (a default system prompt when the chat has none) and Hermes-style <tool_call> tool calls. LoRA
adapts the attention and the MLP projections."""

from aegis.families import Family, register

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

FAMILY = register(Family(
    name="qwen2", gguf_arch="qwen2",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    chat_template=CHAT_TEMPLATE, chat_markers=("<|im_start|>", "<|im_end|>"),
    end_of_turn=("<|im_end|>", "<|endoftext|>"), ollama_format="ChatML (default system prompt)", tools="hermes",
    bpe_pre="qwen2"))
