"""What resuming a run needs besides the weights: the optimizer's state and the random number generators' states,
written as safetensors (tensors) plus plain JSON-able values for the checkpoint's trainer_state.json, never pickled.
aegis/checkpoint.py writes and reads them as part of a checkpoint."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

# torch is imported by the functions that move tensors (the core starts without it)
if TYPE_CHECKING:
    import torch


def save_optimizer(path: Path, optimizer) -> dict:
    """The optimizer's tensors to `path`; returns what trainer_state.json keeps of it (the parameter groups)."""
    import torch
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"{idx}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return {"param_groups": sd["param_groups"]}


def load_optimizer(path: Path, optimizer, groups: dict) -> None:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    state: dict[int, dict] = {}
    for key, value in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(torch's and CUDA's generator states as tensors, Python's as JSON-able values)."""
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def restore_rng(path: Path, py: dict) -> None:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = py["python"]
    random.setstate((version, tuple(internal), gauss))
