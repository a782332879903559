"""The text of `--help` for aegis/cli.py's commands: the usage line, the description wrapped at WIDTH, then one entry
per option or command, its text in a column that starts at COLUMN."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cli import Option

WIDTH, COLUMN = 100, 28
HELP = "-h, --help"


def metavar(o: Option) -> str:
    if o.metavar:
        return o.metavar
    if o.kind in (int, float) or getattr(o.parse, "kind", None) in (int, float):
        return "N"
    return "|".join(o.choices) if o.choices and len("|".join(o.choices)) <= 16 else o.name.upper()


def _entry(head: str, text: str) -> list[str]:
    """One option's lines of help: its flag, and its text wrapped in a column."""
    body = textwrap.wrap(text, WIDTH - COLUMN, break_on_hyphens=False, break_long_words=False) or [""]
    first = f"  {head}"
    if len(first) > COLUMN - 2:
        return [first] + [" " * COLUMN + b for b in body]
    return [first.ljust(COLUMN) + body[0]] + [" " * COLUMN + b for b in body[1:]]


def _describe(o: Option) -> str:
    notes = []
    if o.required:
        notes.append("required")
    elif o.kind is not bool and o.default not in (None, "", []) and "default" not in o.help:
        notes.append(f"default: {', '.join(map(str, o.default)) if o.repeat else o.default}")
    if o.repeat:
        notes.append("repeatable" + (", or comma-separated" if o.commas else ""))
    if o.choices and len(", ".join(o.choices)) < 60:
        notes.append(f"one of {', '.join(o.choices)}")
    if o.env:
        notes.append(f"env {o.env}")
    return o.help + (f" ({'; '.join(notes)})" if notes else "")


def _paragraphs(text: str) -> list[str]:
    return [
        line
        for p in textwrap.dedent(text or "").strip().split("\n\n")
        for line in [*textwrap.wrap(" ".join(p.split()), WIDTH, break_on_hyphens=False), ""]
    ]


def _usage(o: Option) -> str:
    if o.positional:
        return o.flag if o.required else f"[{o.flag}]"
    return f"{o.flag} {metavar(o)}"


def help_text(opts: Sequence[Option], description: str | None, prog: str) -> str:
    """usage, description, then the options, each with its default, choices and variable."""
    need = "".join(_usage(o) + " " for o in opts if o.required or o.positional)
    lines = [f"usage: {prog} {need}[options]", "", *_paragraphs(description), "options:"]
    for o in opts:
        lines += _entry(o.flag if o.kind is bool or o.positional else f"{o.flag} {metavar(o)}", _describe(o))
    return "\n".join(lines + _entry(HELP, "show this help and exit")) + "\n"


def commands_help(commands: Mapping[str, type], prog: str, description: str) -> str:
    """usage, description, then the commands (each its class docstring's first line) and the options."""
    lines = [f"usage: {prog} COMMAND [options]", "", *_paragraphs(description), "commands:"]
    for name, cls in commands.items():
        lines += _entry(name, " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()))
    lines += ["", "options:", *_entry(HELP, f"show this help and exit ({prog} COMMAND --help: the command's)")]
    return "\n".join(lines) + "\n"
