"""The memory a training step may use on its device, and the refusal of a plan that does not fit it: the budget
part of aegis/memory.py's planning (its docstring has the rule)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ConfigError

if TYPE_CHECKING:
    from .memory import Plan

DEVICE_RESERVE_GIB = 0.5  # what cuBLAS workspaces, the allocator's cache and other processes may still take


def device_budget(
    configured: float, free_gib: float | None, where: str = "the GPU has {:.1f} GiB free"
) -> tuple[float, str]:
    """The budget a plan can use: train.memory_budget_gib, or less where the device has less than that (a 12 GB
    card also holds the CUDA context and maybe a desktop; a CPU has the machine's memory). Returns (budget, a note
    for the log when lowered)."""
    if free_gib is None or free_gib - DEVICE_RESERVE_GIB >= configured:
        return configured, ""
    budget = max(free_gib - DEVICE_RESERVE_GIB, 0.0)
    return budget, (
        f"{where.format(free_gib)}, so the plan is for {budget:.1f} GiB, not train.memory_budget_gib {configured:g}"
    )


def refuse_over_budget(p: Plan, length: int, batch: int) -> None:
    """A plan whose step is estimated over its budget even in its most frugal form cannot run: refused with the
    estimate and the budget, before any weights load (the allocation would fail only after minutes of loading)."""
    if p.estimate_gib <= p.budget_gib:
        return
    layout = ", ".join(
        [
            f"micro-batch {p.micro_batch} of train.batch_size {batch}",
            f"gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}",
        ]
        + [
            name
            for name, on in (
                ("activations offloaded", p.offload),
                ("MLP tiled", p.tiled_mlp),
                ("attention tiled", p.tiled_attention),
            )
            if on
        ]
    )
    raise ConfigError(
        f"train.max_length {length}",
        [
            f"the training step is estimated at {p.estimate_gib:,.1f} GiB ({layout}), over the memory budget of "
            f"{p.budget_gib:,.1f} GiB (train.memory_budget_gib, or what the device has); lower train.max_length, "
            f'leave the memory settings at "auto", or raise the budget'
        ],
    )
