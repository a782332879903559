"""Model families: everything AEGIS knows about one family of models in one file of this package, read by train
(LoRA targets, which bases it accepts), export (GGUF architecture and tensor layout, vocabulary, end-of-turn token,
the Ollama Modelfile's template and the tool format it writes) and serve (end-of-turn tokens, the tool-call
format), each from this registry. Adding a family is adding a module here that calls `register`, and its test data in
tests/support/families.py.

A family is found by its Hugging Face `model_type` (a base's config.json), by its GGUF architecture, or by the chat
template a model ships (the tool format follows the chat format, whatever the architecture: `by_chat_template`)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from aegis import tool_format

from . import _ollama


@dataclass(frozen=True)
class Family:
    name: str  # the Hugging Face model_type, and the family's name everywhere in AEGIS
    gguf_arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES) it is written as
    lora_targets: tuple[str, ...]  # module names `lora.target_modules = "auto"` adapts
    chat_template: str  # the Jinja chat template of the family's chat format (what its instruct models ship)
    chat_markers: tuple[str, ...]  # tokens every chat template of this format holds (how a served model is matched)
    end_of_turn: tuple[str, ...]  # tokens that end a reply, the format's own end-of-turn token first
    ollama_format: str  # the format name of the Modelfile template its own chat template proves to
    tools: str = "json"  # its tool-call format, a name in aegis.tool_format.FORMATS
    # its Ollama Modelfile templates (Go) for a tokenizer's facts, most likely first, each with its tool section in
    # the tool format the facts name; export takes the first that renders as the chat template does
    ollama: Callable[[_ollama.Facts], list[_ollama.Template]] = _ollama.none
    permute_qk: bool = False  # q/k rows reordered for llama.cpp's interleaved rotary layout (HF rotates halves)
    longrope: bool = False  # LongRoPE factors written as tensors and the original context as metadata
    bpe_pre: str | None = None  # llama.cpp's pre-tokenizer usual for its byte-level BPE tokenizer, tried first

    @property
    def tool_format(self) -> tool_format.ToolFormat:
        return tool_format.get(self.tools)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds a family; its tool format must exist, and its name and chat markers be its own."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    if family.tools not in tool_format.FORMATS:
        raise ValueError(f"model family {family.name!r}: unknown tool format {family.tools!r}")
    FAMILIES[family.name] = family
    return family


def get(name: str) -> Family | None:
    """The family of a Hugging Face model_type (None: AEGIS does not support it)."""
    return FAMILIES.get(name)


def by_arch(arch: str) -> list[Family]:
    """The families written as llama.cpp architecture `arch` (Llama and Mistral share `llama`)."""
    return [f for f in FAMILIES.values() if f.gguf_arch == arch]


def by_chat_template(template: str | None) -> Family:
    """The family whose chat format the template is: the first whose markers it all holds (registry order: the
    most specific markers first), else Phi-3's, whose tool format (AEGIS's own) needs no markers."""
    for family in FAMILIES.values():
        if template and family.chat_markers and all(m in template for m in family.chat_markers):
            return family
    return FAMILIES["phi3"]


def end_of_turn() -> tuple[str, ...]:
    """Every family's end-of-turn tokens, in registry order: a model stops at those its vocabulary has."""
    return tuple(dict.fromkeys(t for f in FAMILIES.values() for t in f.end_of_turn))


# every module of this package is a family (but those named _*, what they share): importing it registers it (modules
# sorted by name, Phi-3's first)
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: (i.name != "phi3", i.name)):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
