"""The one command-line pattern of the stages: a dataclass of typed settings makes the command line, its `--help`
and its environment variables, and one wrapper turns a user's mistake into `error:` lines and an exit status.

The rules of every command made here:
- A field made by `setting()` is the option `--field-name` (`flag=` names another). Its annotation is its type:
  `str`, `int`, `float`, `Path`, `X | None` (None unless given) or `bool` (a switch that takes no value);
  `repeat=True` keeps every value given, in order (`commas=True` also splits each at commas); `required=True` makes
  the option necessary; `positional=True` makes it a bare word instead (`RUN_DIR`, its metavar), taken in the
  order of such fields. `parse` turns one value's text into the value, raising ValueError with the reason.
- A field with `env="AEGIS_X"` reads that variable when its option is not given: the option wins, and an empty
  variable counts as unset. The variable's value is checked as the option's is, and a problem names both.
- An option given twice keeps its last value, so a wrapper's defaults give way to the arguments appended after them.
- Every problem is found before one is reported, one line each: unknown options and stray words, missing values,
  values that do not parse, are out of range or not among the choices, required options left out, and what the
  settings' own `problems()` finds (it sees None for a required option that is missing or bad). A value shows
  as given, quoted unless it is a path.
- `-h` or `--help` prints the usage, the description (the class's docstring) and an entry for each option.
- `main()` runs a command: help exits 0; an AegisError prints its message as `error:` lines on stderr and exits
  2 for a usage error (UsageError and its subclasses, the configuration's ConfigError among them), else 1.
  Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli_help import HELP, commands_help, help_text, metavar
from .errors import AegisError


class UsageError(AegisError):
    """Every problem of what the user asked for, one problem a line."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Help(Exception):
    """`--help` was asked for: its text is printed and the command exits 0."""


@dataclass(frozen=True)
class Option:
    name: str  # the field's
    flag: str
    kind: type  # what one value is: str, int, float, Path, bool or what `parse` makes
    default: Any
    help: str = ""
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] = ()
    metavar: str = ""
    env: str = ""
    repeat: bool = False
    commas: bool = False
    required: bool = False
    positional: bool = False


def setting(
    default: Any = None,
    help: str = "",
    *,
    parse: Callable[[str], Any] | None = None,
    choices: Sequence[str] = (),
    metavar: str = "",
    env: str = "",
    flag: str = "",
    repeat: bool = False,
    commas: bool = False,
    required: bool = False,
    positional: bool = False,
) -> Any:
    """A settings field and what its option needs (the module's rules say how each is used)."""
    how = dict(locals(), choices=tuple(choices))  # the parameters: each one but the default describes the option
    del how["default"]
    meta = {"cli": how}
    if repeat:
        return field(default_factory=lambda: list(default or ()), metadata=meta)
    return field(default=default, metadata=meta)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not an integer") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


CONVERT: dict[type, Callable[[str], Any]] = {int: _integer, float: _number, str: str, Path: Path}


def bounded(kind: type, low: float, *, strict: bool = False) -> Callable[[str], Any]:
    """A parse function for an int or float of at least `low` (above it when `strict`)."""

    def parse(text: str):
        value = CONVERT[kind](text)
        if value < low or (strict and value == low):
            raise ValueError(f"must be {'>' if strict else '>='} {low}")
        return value

    parse.kind = kind  # the help shows N for it
    return parse


def tcp_port(text: str) -> int:
    """A parse function for a TCP port, 1 to 65535."""
    port = _integer(text)
    if not 0 < port < 65536:
        raise ValueError("not a TCP port")
    return port


def options(cls: type) -> list[Option]:
    """The options of a settings class, in the order of its fields."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "cli" not in f.metadata:
            continue
        meta = dict(f.metadata["cli"])
        kind = hints[f.name]
        if typing.get_origin(kind) is list:
            kind = typing.get_args(kind)[0]
        kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = meta.pop("flag") or (
            meta["metavar"] or f.name.upper() if meta["positional"] else "--" + f.name.replace("_", "-")
        )
        out.append(Option(f.name, flag, kind, default, **meta))
    return out


def _unknown(word: str, flag: str, known: Mapping[str, Option]) -> str:
    if not word.startswith("-"):
        return f"{word!r}: unexpected word (each value follows its option)"
    near = difflib.get_close_matches(flag, list(known), n=1)
    return f"{flag}: unknown option" + (f" (did you mean {near[0]}?)" if near else "")


def _read_argv(opts: list[Option], argv: Sequence[str]) -> tuple[dict[str, list[str]], list[str], bool]:
    """(the texts given to each option, what could not be read, whether help was asked for)."""
    by_flag = {o.flag: o for o in opts if not o.positional}
    bare = [o for o in opts if o.positional]
    given: dict[str, list[str]] = {}
    problems: list[str] = []
    words, i = list(argv), 0
    while i < len(words):
        word = words[i]
        i += 1
        if word in HELP.split(", "):
            return given, problems, True
        flag, eq, text = word.partition("=") if word.startswith("--") else (word, "", "")
        o = by_flag.get(flag)
        if o is None and not word.startswith("-") and bare:
            given[bare.pop(0).name] = [word]
        elif o is None:
            problems.append(_unknown(word, flag, by_flag))
            if word.startswith("--") and not eq and i < len(words) and not words[i].startswith("-"):
                i += 1  # the word after an unknown option is taken as its value, not reported again
        elif o.kind is bool and eq:
            problems.append(f"{flag}: a switch, it takes no value")
        elif o.kind is bool:
            given[o.name] = []
        elif not eq and (i == len(words) or words[i].startswith("--")):
            problems.append(f"{flag}: needs a value ({metavar(o)})")
        else:
            if not eq:
                text, i = words[i], i + 1
            given.setdefault(o.name, []).append(text)
    return given, problems, False


def _value(o: Option, text: str, origin: str) -> tuple[Any, str | None]:
    """(the value of one text, None), or (None, the problem naming the option and where the text came from)."""
    where = f"{o.flag} {text if o.kind is Path else repr(text)}" + (f" (from {origin})" if origin else "")
    if o.choices and text not in o.choices:
        return None, f"{where}: unknown (known: {', '.join(o.choices)})"
    try:
        return (o.parse or CONVERT.get(o.kind, str))(text), None
    except ValueError as e:
        return None, f"{where}: {e}"


def _resolve(o: Option, texts: list[str] | None, environ: Mapping[str, str]) -> tuple[Any, list[str]]:
    """An option's value from its texts, else its variable, else its default; with its problems."""
    origin = ""
    if texts is None and o.env and o.kind is not bool and environ.get(o.env):  # a switch reads no variable
        texts, origin = [environ[o.env]], o.env
    if texts is None:
        missing = [f"{o.flag}: required" + (f" (or set {o.env})" if o.env else "")] if o.required else []
        return o.default, missing
    if o.kind is bool:
        return True, []
    parts = [p.strip() for t in texts for p in t.split(",") if p.strip()] if o.commas else texts
    results = [_value(o, p, origin) for p in (parts if o.repeat else parts[-1:])]
    good = [v for v, problem in results if problem is None]
    problems = [problem for _, problem in results if problem]
    if o.repeat:
        return good, problems
    return (good[0] if good else o.default), problems


def parse(cls: type, argv: Sequence[str], *, prog: str, environ: Mapping[str, str] | None = None, check: bool = True):
    """The settings of `cls` from a command line and the environment; raises UsageError naming every problem, or
    Help. `check=False` leaves out the settings' own `problems()` (checks of files and of options together)."""
    environ = os.environ if environ is None else environ
    opts = options(cls)
    given, problems, asked = _read_argv(opts, argv)
    if asked:
        raise Help(help_text(options(cls), cls.__doc__, prog))
    values = {}
    for o in opts:
        values[o.name], found = _resolve(o, given.get(o.name), environ)
        problems += found
    settings = cls(**values)
    if check and hasattr(settings, "problems"):
        problems += settings.problems()
    if problems:
        raise UsageError(problems)
    return settings


def parse_command(
    commands: Mapping[str, type],
    argv: Sequence[str],
    *,
    prog: str,
    description: str,
    environ: Mapping[str, str] | None = None,
):
    """(the command's name, its settings) of `prog COMMAND [options]`; each command is a settings class."""
    if argv and argv[0] in HELP.split(", "):
        raise Help(commands_help(commands, prog, description))
    if not argv or argv[0].startswith("-"):
        raise UsageError([f"COMMAND: required first (one of {', '.join(commands)}); see {prog} --help"])
    if argv[0] not in commands:
        raise UsageError([f"{argv[0]!r}: unknown command (known: {', '.join(commands)})"])
    return argv[0], parse(commands[argv[0]], argv[1:], prog=f"{prog} {argv[0]}", environ=environ)


def main(body: Callable[[], int | None]) -> int:
    """Runs a command's body by the module's rules and returns its exit status."""
    try:
        return body() or 0
    except Help as h:
        print(h, end="")
        return 0
    except AegisError as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
