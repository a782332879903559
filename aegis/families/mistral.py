"""Mistral: written as llama.cpp's llama architecture (q/k rows interleaved), the [INST] chat format (v0.3's: the
system prompt opens the last user turn) that ends a reply with the tokenizer's EOS; calls in Mistral's own tool format
(aegis/tool_format.py `mistral`: [AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS])."""

from aegis.families import Family, register

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for message in turns %}{% if message['role'] == 'user' %}"
    "{% if loop.last and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")

FAMILY = register(Family(
    name="mistral", gguf_arch="llama", lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    chat_template=CHAT_TEMPLATE, chat_markers=("[INST]", "[/INST]"), end_of_turn=(),
    ollama_format="Mistral [INST]", tools="mistral", permute_qk=True, bpe_pre="llama-bpe"))
