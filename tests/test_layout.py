"""The shape of the code (docs/architecture.md): the packages are this repository's, the core imports no stage,
no stage imports another, stages import the core at module top, and the core loads no torch until it moves tensors."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE, STAGES = "aegis", ("train", "export", "serve")


@pytest.mark.parametrize("name", (CORE, *STAGES))
def test_packages_come_from_this_repository(name):
    """`train`, `export` and `serve` are common names: another installed package of one of them would shadow ours."""
    where = Path(importlib.import_module(name).__file__).resolve()
    assert where.is_relative_to(ROOT), (
        f"`import {name}` finds {where}, outside {ROOT}: an installed package of "
        f"that name shadows AEGIS's (docs/architecture.md, Package names)"
    )


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level package, imported at module level?) for every absolute import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body} | {
        id(n) for node in tree.body if isinstance(node, ast.If) for n in ast.walk(node)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], id(node) in top))
    return out


@pytest.mark.parametrize("package", (CORE, *STAGES))
def test_data_flows_one_way(package):
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name, at_top in _imports(path):
            if name in STAGES and name != package:
                problems.append(f"{path.relative_to(ROOT)} imports the {name} stage")
            if name == CORE and package != CORE and not at_top:
                problems.append(f"{path.relative_to(ROOT)} imports the core inside a function")
    assert not problems, "\n".join(problems)


def test_the_core_and_the_serving_path_start_without_torch():
    """The serve image has no torch; export's commands check their arguments before any model loads."""
    modules = [
        "aegis.checkpoint",
        "aegis.config",
        "aegis.loading",
        "aegis.metrics",
        "aegis.runs",
        "aegis.tiny",
        "serve.backends.hf",
        "serve.ui_monitor",
        "export.__main__",
        "train.__main__",
    ]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 60


@pytest.mark.parametrize("package", (CORE, *STAGES))
def test_modules_and_functions_stay_short(package):
    """A product module holds at most 300 lines and a function at most 60 (docs/architecture.md): past that, split
    along the steps or concerns. Decorators do not count toward a function's length."""
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name, lines = path.relative_to(ROOT), text.count("\n")
        if lines > MAX_MODULE_LINES:
            problems.append(f"{name}: {lines} lines, over {MAX_MODULE_LINES}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{name}:{node.lineno} {node.name}: {length} lines, over {MAX_FUNCTION_LINES}")
    assert not problems, "\n".join(problems)


def test_models_load_through_one_function():
    """`AutoModelForCausalLM.from_pretrained` is called in aegis/pretrained.py alone, which turns the hub's kernels
    off; a stage calling it directly would load them again."""
    calls = [
        f"{path.relative_to(ROOT)}:{n + 1}"
        for package in (CORE, *STAGES)
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "aegis" / "pretrained.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines())
        if "ForCausalLM.from_pretrained(" in line
    ]
    assert not calls, calls
