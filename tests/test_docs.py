"""The documentation (README.md and docs/*.md) builds as a site with no broken link or anchor, and names only what
exists: files, modules and their attributes, config keys, and the options of AEGIS's own commands.

What is checked in a doc's backticked text and code blocks:
- a path under a tracked top-level entry (`serve/config.py`, `configs/*.toml`) exists;
- a dotted name of the core or a stage (`aegis.loading.AUTO_TARGETS`) is a module, or an attribute defined in one;
  `section.key` of the run configuration (`train.tiled_mlp`) is a field of aegis/config.py's dataclasses;
- `NAME` in (or of) `file.py` is defined in that file; a code name (`check_template`, `TYPES`, `fold()`) is defined
  or used somewhere in the code;
- every option given to `python -m MODULE` or `python bench/X.py` is in that command's `--help`, and every key
  given to `--set` exists; an option quoted alone (`--ctx-size`) belongs to one of AEGIS's commands or to a
  third-party command the docs show.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("aegis", "train", "export", "serve")
SCRIPT_DIRS = ("bench", "reports", "tools")
CODE_SUFFIXES = {".py", ".toml", ".yaml", ".yml", ".sh", ".conf", ".jinja", ".cfg"}
# `soul.safetensors`, `export.json`: file names, not dotted names
FILE_SUFFIXES = ("py", "json", "jsonl", "safetensors", "toml", "yaml", "md", "gguf", "txt", "png", "sh", "modelfile")
# Names of other projects that the docs quote (nginx directives, in scale-out.md's comparison of balancers)
THIRD_PARTY = {"health_check", "non_idempotent"}


# ---- reading the docs -------------------------------------------------------------------------------------------


def split_doc(text: str) -> tuple[list[str], list[str]]:
    """(inline code spans of the prose, lines of the fenced code blocks with backslash continuations joined)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    spans = [s.replace("\\|", "|") for s in re.findall(r"`([^`\n]+)`", prose)]
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    return spans, lines


def doc_texts() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in DOCS}


# ---- what the code defines ----------------------------------------------------------------------------------------


@cache
def tracked() -> tuple[str, ...]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return tuple(out.split())


@cache
def code_text() -> str:
    """Every tracked file of code or configuration (not the docs), for "is this name used anywhere"."""
    parts = []
    for name in tracked():
        p = ROOT / name
        if (p.suffix in CODE_SUFFIXES or p.name in ("Dockerfile", "Makefile")) and p.is_file():
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


def used_in_code(name: str) -> bool:
    """As a word of the code; a Prometheus counter is declared without the _total its samples carry."""
    return any(
        re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", code_text()) for n in {name, name.removesuffix("_total")}
    )


@cache
def defined_in(path: Path) -> frozenset[str]:
    """Names a Python file defines at module level or in a class body (functions, classes, assignments, imports)."""
    names: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                names.add(node.name)
                visit(node.body)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(
                    node.body + getattr(node, "orelse", []) + [n for h in getattr(node, "handlers", []) for n in h.body]
                )

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return frozenset(names)


@cache
def functions() -> frozenset[str]:
    names: set[str] = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            names.update(
                n.name
                for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
    return frozenset(names)


@cache
def config_keys() -> dict[str, frozenset[str]]:
    from aegis.config import Config

    return {
        f.name: frozenset(g.name for g in dataclasses.fields(f.default_factory())) for f in dataclasses.fields(Config)
    }


def module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for p in (base.with_suffix(".py"), base / "__init__.py", base / "__main__.py"):
        if p.is_file():
            return p
    return None


def resolves(dotted: str) -> bool:
    """`aegis.loading.AUTO_TARGETS`: the longest prefix that is a module, the rest defined in it."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        path = module_file(parts[:i])
        if path is not None:
            rest = parts[i:]
            return not rest or rest[0] in defined_in(path) and all(r in defined_in(path) for r in rest[1:])
    return False


# ---- AEGIS's commands and their options ---------------------------------------------------------------------------

EXPORT_COMMANDS = ("merge", "gguf", "parity", "modelfile", "ollama", "all")


def command_of(tokens: list[str]) -> tuple[tuple[str, ...] | None, list[str]]:
    """(the AEGIS command in a shell segment, e.g. ("-m", "export", "gguf") or ("bench/x.py",), its arguments)."""
    for i, tok in enumerate(tokens):
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1].split(".")[0] in PACKAGES:
            module, args = tokens[i + 1], tokens[i + 2 :]
            if module == "export" and args and args[0] in EXPORT_COMMANDS:
                return ("-m", module, args[0]), args[1:]
            return ("-m", module), args
        if (
            tok.endswith(".py")
            and tok.split("/")[0] in SCRIPT_DIRS
            and i > 0
            and Path(tokens[i - 1]).name.startswith("python")
        ):
            return (tok,), tokens[i + 1 :]
    return None, []


def segments(line: str) -> list[list[str]]:
    """A shell line cut at &&, ||, ;, | and & into token lists, comments and brackets of usage lines dropped."""
    line = re.sub(r"(^|\s)#.*", "", line)
    out = []
    for seg in re.split(r"\s(?:&&|\|\||;|\||&)(?=\s|$)|;\s|^\{\s|\s\}$", line):
        try:
            tokens = shlex.split(seg)
        except ValueError:
            tokens = seg.split()
        tokens = [t.strip("[]{}();") for t in tokens]
        if tokens:
            out.append(tokens)
    return out


@cache
def help_text(command: tuple[str, ...]) -> str:
    args = [sys.executable, *command, "--help"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(command)} --help failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def options(command: tuple[str, ...]) -> set[str]:
    if command == ("-m", "export"):  # no subcommand named: any of them
        return set().union(*(options(("-m", "export", c)) for c in EXPORT_COMMANDS))
    return set(re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", help_text(command)))


MAIN_COMMANDS = [("-m", "train"), ("-m", "serve"), ("-m", "serve.ui"), *(("-m", "export", c) for c in EXPORT_COMMANDS)]


@pytest.fixture(scope="module")
def commands() -> dict[tuple[str, ...], list[tuple[str, list[str]]]]:
    """Every AEGIS command the docs run, with (doc, arguments) of each place; their --help read in parallel."""
    found: dict[tuple[str, ...], list[tuple[str, list[str]]]] = {c: [] for c in MAIN_COMMANDS}
    for doc, text in doc_texts().items():
        spans, lines = split_doc(text)
        for line in lines + spans:
            for tokens in segments(line):
                command, args = command_of(tokens)
                if command:
                    found.setdefault(command, []).append((doc, args))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(options, [c for c in found if c != ("-m", "export")]))
    return found


# ---- the tests ----------------------------------------------------------------------------------------------------


def test_the_site_builds_with_no_broken_link_or_anchor(tmp_path):
    """mkdocs.yml is strict and makes unknown links and anchors warnings, so any of them fails the build."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_the_site_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == set(re.findall(r"([\w-]+\.md)", nav)), "mkdocs.yml's nav and docs/*.md differ"


def placeholder(path: str) -> bool:
    """RUN/export/NAME.gguf, modelfiles/NAME.modelfile: a name for the reader to fill in."""
    return any(re.fullmatch(r"[A-Z][A-Z0-9_]+(\.\w+)?", part) for part in path.split("/"))


def path_problems(doc: str, token: str) -> list[str]:
    token = token.rstrip(".,:")
    top = {t.split("/")[0] for t in tracked()}
    if "/" not in token or token.split("/")[0] not in top or placeholder(token) or "://" in token:
        return []
    if any(ch in token for ch in "*?"):
        return [] if list(ROOT.glob(token)) else [f"{doc}: `{token}` matches no file"]
    return [] if (ROOT / token).exists() else [f"{doc}: `{token}` does not exist"]


def doc_spans() -> list[tuple[str, str]]:
    """(doc, span) for each code span of each doc."""
    return [(doc, span) for doc, text in doc_texts().items() for span in split_doc(text)[0]]


def test_named_files_exist():
    problems = [p for doc, span in doc_spans() if re.fullmatch(r"[\w.*/-]+", span) for p in path_problems(doc, span)]
    for doc, text in doc_texts().items():
        for line in split_doc(text)[1]:
            for tokens in segments(line):
                for tok in tokens:
                    tok = tok.split("=", 1)[-1]
                    if re.fullmatch(r"\.?[\w][\w.*/-]*", tok):
                        problems += path_problems(doc, tok)
    assert not problems, "\n".join(sorted(set(problems)))


def name_problem(doc: str, name: str) -> str | None:
    """A dotted name: a config key `section.key`, or a module / attribute of the core or a stage."""
    name = name.split(" = ", 1)[0].removesuffix("()")
    if name.rsplit(".", 1)[-1] in FILE_SUFFIXES:
        return None
    first, _, rest = name.partition(".")
    keys = config_keys()
    if first in keys and "." not in rest and rest in keys[first]:
        return None  # a config key (train.lr); the train stage's own modules are checked below
    if first in keys and first not in PACKAGES:
        return f"{doc}: `{name}` is not a config key (aegis/config.py)"
    if first in PACKAGES and not resolves(name):
        return f"{doc}: `{name}` is neither a module nor defined in one" + (
            f", nor a config key of [{first}]" if first in keys else ""
        )
    return None


def test_named_modules_attributes_and_config_keys_exist():
    problems = [
        name_problem(doc, span) for doc, span in doc_spans() if re.fullmatch(r"[a-z_]\w*(\.\w+)+(\(\))?( = .+)?", span)
    ]
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)


def test_code_names_exist():
    problems = []
    for doc, text in doc_texts().items():
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
        for name, path in re.findall(r"`([A-Za-z_]\w*)`\s+(?:in|of)\s+`([\w./-]+\.py)`", prose):
            file = ROOT / path
            if not file.is_file() or name not in defined_in(file):
                problems.append(f"{doc}: `{name}` is not defined in {path}")
        spans, _ = split_doc(text)
        for span in spans:
            if re.fullmatch(r"[a-z_]\w*\(\)", span) and span[:-2] not in functions():
                problems.append(f"{doc}: `{span}` is no function of {', '.join(PACKAGES)}")
            elif (
                re.fullmatch(r"[A-Za-z]\w*", span)
                and ("_" in span or re.fullmatch(r"[A-Z]{4,}", span))
                and span not in THIRD_PARTY
                and not used_in_code(span)
            ):
                problems.append(f"{doc}: `{span}` appears nowhere in the code")
    assert not problems, "\n".join(problems)


def test_options_of_aegis_commands_exist(commands):
    problems = []
    for command, places in commands.items():
        known = options(command)
        for doc, args in places:
            for i, arg in enumerate(args):
                flag = arg.split("=", 1)[0]
                if flag.startswith("--") and flag not in known:
                    problems.append(f"{doc}: {' '.join(command)} has no option {flag}")
                if flag == "--set" and i + 1 < len(args) and not placeholder(args[i + 1].split("=")[0]):
                    key = args[i + 1].split("=", 1)[0]
                    if name_problem(doc, key) or key.count(".") != 1:
                        problems.append(f"{doc}: --set {key}: no such config key")
    assert not problems, "\n".join(sorted(set(problems)))


def test_options_quoted_alone_belong_to_a_command(commands):
    ours = set().union(*(options(c) for c in commands))
    theirs = set()  # options of third-party commands the docs show (docker compose --scale, ollama -f)
    for text in doc_texts().values():
        spans, lines = split_doc(text)
        for line in lines + [s for s in spans if " " in s]:
            for tokens in segments(line):
                if command_of(tokens)[0] is None and not tokens[0].startswith("-"):  # a command, not an option
                    theirs.update(t.split("=")[0] for t in tokens if t.startswith("--"))
    problems = []
    for doc, text in doc_texts().items():
        for span in split_doc(text)[0]:
            flag = span.split()[0].split("=")[0]
            if re.fullmatch(r"--[a-z][\w-]*", flag) and flag not in ours | theirs:
                problems.append(f"{doc}: `{span}`: no AEGIS command has {flag}")
            words = span.split()
            if flag == "--set" and len(words) > 1 and not placeholder(words[1].split("=")[0]):
                key = words[1].strip("'\"").split("=", 1)[0]
                if key.count(".") != 1 or name_problem(doc, key):
                    problems.append(f"{doc}: `{span}`: no such config key")
    assert not problems, "\n".join(problems)
