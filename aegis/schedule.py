"""The phase-transition schedule for the soul's gate logit α.

One pure function, `alpha_at`, gives α for an update index s = 0, 1, 2, ...:

    a(s) = start                                         if s < warmup              (chaos)
    a(s) = start + f((s - warmup) / anneal) * (target - start)
                                                         if s < warmup + anneal     (transition)
    a(s) = target                                        otherwise                  (golden)

with f(t) = t for the seed's `linear` shape, a logistic S-curve rescaled to f(0)=0, f(1)=1 for `sigmoid`,
and (1 - cos(pi t)) / 2 for `cosine`. Update k (k = 1 ... total) uses a(k - 1), so with the seed recipe
(warmup 50, anneal 400) steps 1..50 sit at the start value and step 451 is the first at the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PHI = (1 + math.sqrt(5)) / 2  # 1.6180339887..., the seed's target
SHAPES = ("linear", "sigmoid", "cosine")
GOLDEN_TOLERANCE = 0.01  # |α - target| below this counts as the golden phase


@dataclass
class Schedule:  # also the [schedule] section of the run configuration
    total_steps: int = 500
    warmup_steps: int = 50
    anneal_steps: int = 400
    start_alpha: float = -5.0
    target_alpha: float = PHI
    shape: str = "linear"


def _shape(t: float, shape: str) -> float:
    if shape == "linear":
        return t
    if shape == "cosine":
        return (1 - math.cos(math.pi * t)) / 2
    if shape == "sigmoid":
        # logistic of steepness 10 centred at t = 1/2, stretched so that the window starts at 0 and ends at 1
        lo, hi = 1 / (1 + math.exp(5)), 1 / (1 + math.exp(-5))
        return (1 / (1 + math.exp(-10 * (t - 0.5))) - lo) / (hi - lo)
    raise ValueError(f"schedule.shape: {shape!r} is not one of {', '.join(SHAPES)}")


def alpha_at(s: int, sched: Schedule) -> float:
    """α for update index `s` (0-based); see the module docstring for the formula."""
    if s < sched.warmup_steps:
        return sched.start_alpha
    if s < sched.warmup_steps + sched.anneal_steps:
        t = (s - sched.warmup_steps) / sched.anneal_steps
        return sched.start_alpha + _shape(t, sched.shape) * (sched.target_alpha - sched.start_alpha)
    return sched.target_alpha


def alpha_for_step(step: int, sched: Schedule) -> float:
    """α used by update `step` (1-based, as in metrics.jsonl)."""
    return alpha_at(step - 1, sched)


def gate(alpha: float) -> float:
    return 1 / (1 + math.exp(-alpha))


def phase(alpha: float, sched: Schedule) -> str:
    """chaos before the anneal has moved α, golden within tolerance of the target, transition between."""
    if abs(alpha - sched.target_alpha) < GOLDEN_TOLERANCE:
        return "golden"
    if alpha == sched.start_alpha:
        return "chaos"
    return "transition"
