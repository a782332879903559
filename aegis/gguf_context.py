"""The context a GGUF is opened with, from its metadata alone (llama.cpp is not loaded): the one rule that the server
(its default context) and export's parity (the replies it records) share, so that what is served is what export
checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# A long-context model's whole context would reserve a large KV cache per request: unless asked, at most this many.
CONTEXT_CAP = 4096
# llama.cpp rounds each sequence's context up to a multiple of this before it picks LongRoPE's factors.
CONTEXT_PAD = 256


@dataclass(frozen=True)
class Context:
    """A GGUF's context lengths, and the one rule for the context the product opens it with: the server by default,
    and export's parity for the replies it records, so that what is served is what export checked.

    LongRoPE (Phi-3's long and short rope factors): llama.cpp picks the factors once per context, the long ones
    whenever a sequence's context exceeds the original one; transformers picks them per sequence, by its length.
    Opened with more than the original context, llama.cpp applies the long factors to every prompt, short ones too,
    and replies differ from transformers' and from what export checked. So a LongRoPE model's default is its
    original context (Phi-3.5-mini: 4096 of 131072; the embedded tiny model: 512 of 2048)."""

    length: int | None  # {arch}.context_length: the longest context the model was made for
    original: int | None  # LongRoPE models only: the original context, above which the long factors apply

    @property
    def default(self) -> int:
        if self.original:
            fit = self.original - self.original % CONTEXT_PAD  # so llama.cpp's rounding stays within it
            return min(fit or self.original, CONTEXT_CAP)
        return min(self.length or CONTEXT_CAP, CONTEXT_CAP)

    def long_factors(self, n_ctx: int) -> bool:
        """Whether llama.cpp, given n_ctx positions per sequence, applies the long factors to every prompt."""
        padded = -(-n_ctx // CONTEXT_PAD) * CONTEXT_PAD
        return bool(self.original) and padded > self.original

    def warning(self, n_ctx: int) -> str | None:
        """What a context of n_ctx changes from the default, in words; None when nothing."""
        if self.long_factors(n_ctx):
            return (
                f"a context of {n_ctx} is above this LongRoPE model's original {self.original}, so llama.cpp "
                f"applies the long rope factors to every prompt, short ones too (transformers uses them only "
                f"for sequences past {self.original} tokens): replies may differ from what export checked in "
                f"a context of {self.default}"
            )
        if self.length and n_ctx > self.length:
            return (
                f"a context of {n_ctx} is above the {self.length} positions this model was made for: past "
                f"those, replies are untested"
            )
        return None


def context(path: Path | str) -> Context:
    """The context lengths in a GGUF's metadata (read without loading llama.cpp)."""
    import gguf  # imported here: only the commands that open a GGUF need it

    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.fields[gguf.Keys.General.ARCHITECTURE].parts[-1]).decode()

    def value(key: str) -> int | None:
        f = reader.fields.get(key.format(arch=arch))
        return int(f.parts[-1][0]) if f is not None else None

    longrope = any(t.name.startswith("rope_factors_long") for t in reader.tensors)
    return Context(
        value(gguf.Keys.LLM.CONTEXT_LENGTH), value(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN) if longrope else None
    )


def trained_context(path: Path | str) -> int | None:
    """The longest context in which llama.cpp runs the model as transformers does at every length: a LongRoPE
    model's original context, else its context length (an Ollama Modelfile's num_ctx)."""
    c = context(path)
    return c.original or c.length
