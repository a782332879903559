"""Run configuration: typed sections read from TOML, `--set section.key=value` overrides, and validation that
reports every problem at once (unknown keys, wrong types, bad values), each naming the file and line, or the
override, and the key. A problem's text starts with the key it is about (`train.lr: ...`, `[extra]: ...`)."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from .cli import UsageError
from .config_checks import coerce, validate
from .schedule import Schedule

EMBEDDED = "embedded"  # model.base for the tiny Phi-3 that ships with the package


@dataclass
class ModelConfig:
    base: str = "HODACHI/Borea-Phi-3.5-mini-Instruct-Jp"
    revision: str = ""  # hub revision; empty for the default branch
    quantization: str = "nf4"
    dtype: str = "auto"  # compute dtype: bf16 on GPUs that have it, fp16 on other GPUs, fp32 on the CPU
    gradient_checkpointing: bool | str = "auto"  # "auto": on only if the step would not fit train.memory_budget_gib
    compile: bool = False  # torch.compile each decoder layer (fuses the many small kernels of a small batch)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "auto"


@dataclass
class SoulConfig:
    mix: str = "interpolate"
    init: str = "identity"
    alpha_mode: str = "scheduled"


@dataclass
class TrainConfig:
    lr: float = 2e-4
    lr_schedule: str = "constant"  # constant | linear | cosine (after lr_warmup_steps of linear warmup)
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 512
    save_steps: int = 100
    keep_last: int = 0  # 0 keeps every checkpoint
    seed: int = 42
    memory_budget_gib: float = 12.0
    cuda_graphs: bool | str = "auto"  # capture each micro-batch's forward + backward once, replay it (train/graphs.py)
    # keep checkpointed activations in host memory until the backward pass ("auto": only when the step would not fit
    # the budget otherwise; long sequences)
    offload_activations: bool | str = "auto"
    # dequantize the 4-bit base once and keep it at 16 bits, saving bitsandbytes' dequantization on every pass
    # ("auto": on a GPU, only when the step fits the budget with it as planned without it; aegis/memory.py)
    dequantized_base: bool | str = "auto"
    # run each MLP a slice of positions at a time ("auto": only when one sequence would not fit the budget otherwise;
    # aegis/tiled.py)
    tiled_mlp: bool | str = "auto"
    # run each attention a few heads at a time on long sequences ("auto": only when one sequence would not fit the
    # budget even with the MLP tiled; aegis/tiled.py)
    tiled_attention: bool | str = "auto"
    # experiment trackers that get every metrics record and the config, any of TRACKERS (config_checks.py); empty: none
    report_to: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["embedded:prose_train.txt"])
    eval: list[str] = field(default_factory=list)
    skip_bad_lines: bool = False
    # "documents": a packed window's examples attend only within themselves, positions restart at each (chat data);
    # "concat": one text per window (pre-training-style text); "auto": documents if the data holds a chat record
    packing: str = "auto"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    soul: SoulConfig = field(default_factory=SoulConfig)
    schedule: Schedule = field(default_factory=Schedule)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


class ConfigError(UsageError):
    """Every problem of a configuration, one line each: `SOURCE: problem`, or what `where` puts in front of a
    problem about a key (`FILE:LINE: ` of the line that sets it, `--set ` for an override), given the key: the
    problem's text up to its first colon, a section's brackets dropped."""

    def __init__(self, source: str, problems: list[str], where: Callable[[str], str | None] = lambda key: None):
        prefixes = [where(p.split(":", 1)[0].strip("[]")) for p in problems]
        super().__init__([(f"{source}: " if w is None else w) + p for w, p in zip(prefixes, problems)])


_LINE = re.compile(r"^\s*(?:\[\s*([\w.-]+)\s*\]|([\w-]+)\s*=)")  # [section] or key =


def key_lines(text: str) -> dict[str, int]:
    """The line of each `[section]` and `section.key` of a TOML text (the keys written one per line, as the
    configs are); a key written another way has no line and is named by its file alone."""
    lines: dict[str, int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), 1):
        if m := _LINE.match(line):
            section = m.group(1) or section
            lines.setdefault(f"{section}.{m.group(2)}" if m.group(2) else section, number)
    return lines


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise ValueError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as nf4 or a path
    return key.strip(), value


def build(
    raw: dict[str, Any], overrides: list[str] = (), source: str = "<config>", lines: dict[str, int] | None = None
) -> Config:
    """Turn nested dict + overrides into a Config, or raise ConfigError listing every problem. `lines` (from
    `key_lines`) gives the line of each key of the source, so a problem names it."""
    problems: list[str] = []
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    overridden = set()
    for text in overrides:
        try:
            key, value = _parse_override(text)
        except ValueError as e:
            problems.append(str(e))
            continue
        section, _, name = key.partition(".")
        overridden.update([key] if section in raw else [key, section])
        merged.setdefault(section, {})
        if isinstance(merged[section], dict):
            merged[section][name] = value
    cfg = Config()
    sections = {f.name: f for f in fields(Config)}
    for section, values in merged.items():
        if section not in sections:
            problems.append(f"[{section}]: unknown section (known: {', '.join(sections)})")
            continue
        if not isinstance(values, dict):
            problems.append(f"{section}: expected a table")
            continue
        target = getattr(cfg, section)
        hints = get_type_hints(type(target))
        for name, value in values.items():
            key = f"{section}.{name}"
            if name not in hints:
                problems.append(f"{key}: unknown key (known: {', '.join(hints)})")
                continue
            coerced = coerce(value, hints[name], key, problems)
            if coerced is not None:
                setattr(target, name, coerced)
    problems += validate(cfg)
    if problems:

        def where(key: str) -> str | None:
            if key.startswith("--set "):  # a problem of the override itself names it
                return ""
            if key in overridden:
                return "--set "
            return f"{source}:{lines[key]}: " if lines and key in lines else None

        raise ConfigError(source, problems, where)
    return cfg


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except OSError as e:  # a directory, no permission
        raise ConfigError(str(path), [f"cannot be read ({e.strerror or e})"]) from None
    try:
        text = data.decode("utf-8")
        raw = tomllib.loads(text)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}",
            [f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); a config is a TOML file"],
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), [f"not valid TOML: {e}"]) from None
    return build(raw, overrides, source=str(path), lines=key_lines(text))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (what the run directory's config.toml holds)."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value, ensure_ascii=False)}")
        lines.append("")
    return "\n".join(lines)
