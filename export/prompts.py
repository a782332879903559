"""The fixed prompts every check runs on: Japanese and English prose, a chat rendered with the model's own chat
template, and (for GGUF parity) one text longer than the original context so LongRoPE's long factors are used."""

from __future__ import annotations

SHORT = [
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "東京の春は桜がきれいで、多くの人が公園に集まります。",
    "The quick brown fox jumps over the lazy dog, and then it rests under a tree.",
    "日本語と English が混ざった文章: 今日は good weather ですね。",
]

CHAT = [
    {"role": "system", "content": "あなたは親切なアシスタントです。"},
    {"role": "user", "content": "日本の首都はどこですか？"},
    {"role": "assistant", "content": "日本の首都は東京です。"},
    {"role": "user", "content": "その都市の有名な場所を教えてください。"},
]

# A longer passage, repeated until it passes the original context length.
LONG_SEED = (
    "むかしむかし、ある山のふもとに小さな村がありました。村の人びとは毎朝早く起きて畑をたがやし、"
    "夕方になると川のほとりに集まって一日のできごとを語り合いました。"
    "In the evening the children listened to the old stories, and the lanterns were lit one by one. "
)


def chat_text(tokenizer, messages=CHAT, add_generation_prompt: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str, templated: bool = False) -> list[int]:
    """Token ids as the HF tokenizer gives them to a user: its own BOS policy for plain text; a rendered chat
    template already holds whatever special tokens it needs."""
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def check_set(tokenizer) -> list[tuple[str, list[int]]]:
    """(label, ids) for the merge check: the short prompts and the chat."""
    items = [(f"short{i}", encode(tokenizer, t)) for i, t in enumerate(SHORT)]
    if tokenizer.chat_template:
        items.append(("chat", encode(tokenizer, chat_text(tokenizer), templated=True)))
    return items


def long_ids(tokenizer, min_tokens: int) -> list[int]:
    """A prompt of just over `min_tokens` tokens (the original context), for the long rope factors."""
    text = LONG_SEED
    while len(encode(tokenizer, text)) <= min_tokens:
        text += LONG_SEED
    ids = encode(tokenizer, text)
    return ids[: min_tokens + 16]
