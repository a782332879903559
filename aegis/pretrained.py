"""Loading a model directory with transformers as every stage does: without the hub's kernels. transformers (5.x)
otherwise swaps layers for kernels it downloads when the model lands on a GPU: remote code, a network fetch that
fails on an offline machine, and other arithmetic than the one training, export and serving check."""

from __future__ import annotations

from pathlib import Path


def pretrained(path: Path | str, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` with the hub's kernels off."""
    from transformers import AutoModelForCausalLM  # imported here: the core's import stays light

    return AutoModelForCausalLM.from_pretrained(path, use_kernels=False, **kwargs)
