"""The checks of a run configuration's values: the type of each field (`coerce`, for what a file or a `--set`
override gives) and the values each key allows (`validate`). They collect problems instead of raising, so a config
(aegis/config.py) reports every problem at once; each problem starts with the key it is about."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, get_origin

from .packing import MODES as PACKING
from .schedule import SHAPES

if TYPE_CHECKING:
    from .config import Config

QUANTIZATIONS = ("nf4", "none")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ALPHA_MODES = ("scheduled", "learned")
LR_SCHEDULES = ("constant", "linear", "cosine")
MIXES = ("interpolate", "residual")  # soul.mix (aegis/soul.py has the maths)
INITS = ("identity", "random")  # soul.init
SEED_MAX = 2**32 - 1  # train.seed seeds Python's, numpy's and torch's generators
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # train.report_to (train/trackers.py)


def coerce(value: Any, typ: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `typ`; strings from --set are parsed as TOML values first."""
    if typ == (bool | str):  # true, false or "auto"
        if isinstance(value, bool) or value == "auto":
            return value
        problems.append(f'{key}: expected true, false or "auto", got {value!r}')
        return None
    if typ == (str | list[str]):  # a single word such as "auto", or a list of names
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        problems.append(f"{key}: expected a string or a list of strings, got {value!r}")
        return None
    if get_origin(typ) is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{key}: expected a list of strings, got {value!r}")
            return None
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: expected true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{key}: expected an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
            problems.append(f"{key}: must be a finite number, got {value}")  # TOML has nan and inf
            return None
        problems.append(f"{key}: expected a number, got {value!r}")
    elif typ is str:
        if isinstance(value, str):
            return value
        problems.append(f"{key}: expected a string, got {value!r}")
    return None


# the keys whose value is one of a list, and the numbers that must be above zero (or at least zero)
CHOICES = {
    "model.quantization": QUANTIZATIONS,
    "model.dtype": DTYPES,
    "soul.mix": MIXES,
    "soul.init": INITS,
    "soul.alpha_mode": ALPHA_MODES,
    "schedule.shape": SHAPES,
    "train.lr_schedule": LR_SCHEDULES,
    "data.packing": PACKING,
}
POSITIVE = (
    "lora.r",
    "lora.alpha",
    "schedule.total_steps",
    "schedule.anneal_steps",
    "train.lr",
    "train.batch_size",
    "train.grad_accum",
    "train.save_steps",
    "train.memory_budget_gib",
)
NOT_NEGATIVE = (
    "schedule.warmup_steps",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.lr_warmup_steps",
    "train.keep_last",
)


def validate(cfg: Config) -> list[str]:
    """Every problem of the values of a Config, each starting with its key."""

    def value(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    p = [
        f"{k}: {value(k)!r} is not one of {', '.join(allowed)}"
        for k, allowed in CHOICES.items()
        if value(k) not in allowed
    ]
    p += [f"{k}: must be > 0, got {value(k)}" for k in POSITIVE if value(k) <= 0]
    p += [f"{k}: must be >= 0, got {value(k)}" for k in NOT_NEGATIVE if value(k) < 0]
    if not cfg.model.base:
        p.append("model.base: must name a hub id, a local directory or 'embedded'")
    if not 0 <= cfg.lora.dropout < 1:
        p.append(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    t = cfg.lora.target_modules
    if isinstance(t, str) and t not in ("auto", "all-linear"):
        p.append(f"lora.target_modules: {t!r} must be 'auto', 'all-linear' or a list of module names")
    if isinstance(t, list) and not t:
        p.append("lora.target_modules: the list is empty")
    s = cfg.schedule
    if s.warmup_steps + s.anneal_steps > s.total_steps:
        p.append(
            f"schedule: warmup_steps + anneal_steps ({s.warmup_steps + s.anneal_steps}) exceeds "
            f"total_steps ({s.total_steps})"
        )
    if not 0 <= cfg.train.seed <= SEED_MAX:  # numpy's generator, seeded with it, takes no other
        p.append(f"train.seed: must be in [0, {SEED_MAX}], got {cfg.train.seed}")
    if cfg.train.max_length < 16:
        p.append(f"train.max_length: must be at least 16, got {cfg.train.max_length}")
    p += [
        f"train.report_to: {name!r} is not one of {', '.join(TRACKERS)}"
        for name in cfg.train.report_to
        if name not in TRACKERS
    ]
    if not cfg.data.train:
        p.append("data.train: at least one source is needed")
    return p
