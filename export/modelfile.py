"""An Ollama Modelfile for an exported GGUF: FROM the file (relative to the Modelfile), the model's own chat format as a
Go TEMPLATE over .Messages with the stop parameters its turns end with, num_ctx, and an optional SYSTEM prompt.

The template is derived from the tokenizer's chat template and proved token for token on a set of conversations
(chat_formats.py); with the GGUF at hand the Modelfile's rendering is also tokenized by the GGUF's own llama.cpp
vocabulary, as Ollama tokenizes it. A chat template no known format reproduces stops the export with the first
difference shown: the Modelfile is never written with a guessed template."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from aegis import gguf_context, llamacpp
from aegis.atomic import write_text

from . import chat_formats
from .files import ExportError

DEFAULT_NUM_CTX = 4096


def _quote(s: str) -> str:
    if '"""' in s:
        raise ExportError('a Modelfile value cannot contain """')
    return f'"""{s}"""'


@dataclass
class Modelfile:
    """What Ollama needs to create the model: as Modelfile text (`render`) or as the create request (ollama.py)."""

    gguf: Path
    template: str
    stops: list[str]
    num_ctx: int
    system: str | None = None
    name: str | None = None
    proof: chat_formats.Proof | None = field(default=None, repr=False)

    @property
    def parameters(self) -> dict:
        return {"stop": list(self.stops), "num_ctx": self.num_ctx}

    def render(self, from_path: str) -> str:
        fmt = self.proof.format if self.proof else "chat"
        lines = [
            f"# Ollama Modelfile{f' for {self.name}' if self.name else ''}, written by `python -m export`.",
            f"# {fmt} chat format, derived from the model's chat template and checked token for token; the",
            "# soul is folded into the head, so nothing else is needed at run time.",
            f"FROM {from_path}",
            "",
            f"TEMPLATE {_quote(self.template)}",
            "",
        ]
        lines += [f'PARAMETER stop "{s}"' for s in self.stops]
        lines.append(f"PARAMETER num_ctx {self.num_ctx}")
        if self.system:
            lines += ["", f"SYSTEM {_quote(self.system)}"]
        return "\n".join(lines) + "\n"


def _llama_cpp_tokenizer(gguf_path: Path):
    """text -> ids as Ollama's runner tokenizes a rendered prompt: BOS as the vocabulary says, special tokens parsed."""
    llm = llamacpp.open_vocab(gguf_path)
    return lambda text: list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))


def model_dir_for(gguf_path: Path, model_dir: Path | None) -> Path:
    """The merged model whose chat template the Modelfile follows: --model, else merged/ beside the GGUF."""
    if model_dir is not None:
        return Path(model_dir)
    beside = Path(gguf_path).parent / "merged"
    if (beside / "config.json").is_file():
        return beside
    raise ExportError(
        f"--model is needed: the Modelfile's template comes from the model's own chat template, and "
        f"there is no merged model at {beside}"
    )


def build(
    gguf_path: Path,
    model_dir: Path,
    system: str | None = None,
    num_ctx: int | None = None,
    name: str | None = None,
    log=print,
) -> Modelfile:
    """The Modelfile for `gguf_path`, its template derived from `model_dir`'s chat template and proved."""
    from transformers import AutoTokenizer

    gguf_path, model_dir = Path(gguf_path), Path(model_dir)
    if not gguf_path.is_file():
        raise ExportError(f"{gguf_path}: no such GGUF file")
    tok = AutoTokenizer.from_pretrained(model_dir)
    runtime = {"the GGUF's llama.cpp vocabulary": _llama_cpp_tokenizer(gguf_path)}
    proof = chat_formats.derive(tok, str(model_dir), runtime)
    log(proof.summary())
    for note in proof.notes:
        log(f"  note: {note}")
    if system and not proof.system:
        raise ExportError(f"--system: {model_dir}'s chat template refuses system messages")
    return Modelfile(
        gguf=gguf_path,
        template=proof.template,
        stops=proof.stops,
        system=system,
        name=name,
        num_ctx=num_ctx or gguf_context.trained_context(gguf_path) or DEFAULT_NUM_CTX,
        proof=proof,
    )


def write(mf: Modelfile, out: Path, log=print) -> None:
    """Write the Modelfile `build` made at `out` (atomically), FROM its GGUF relative to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(mf.gguf.resolve(), out.parent.resolve())
    from_path = rel if rel.startswith("..") else f"./{rel}"
    write_text(out, mf.render(from_path))
    log(f"wrote {out} (FROM {from_path}, num_ctx {mf.num_ctx})")
