"""The one command-line pattern (aegis/cli.py), proved on the real `python -m train|export|serve` processes: the same
--help shape, a variable and an option both setting a value (the option wins), and every bad argument reported at
once, one `error:` line each, exit status 2, no traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from aegis import cli
from aegis.cli import setting

ROOT = Path(__file__).resolve().parents[1]
HELPS = [("train",), ("serve",), ("export",), *(("export", c) for c in
                                                ("merge", "gguf", "parity", "modelfile", "ollama", "all"))]
ENTRY = re.compile(r"^  (-h, --help|--[a-z][a-z-]*|[a-z]+)( \S+)?(\s{2,}\S.*)?$")  # an option or a command
MORE = re.compile(r"^ {28}\S")  # an entry's text, continued


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AEGIS_")} | env
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=300)


def runs(*commands: tuple[tuple[str, ...], dict[str, str]]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda c: run(*c[0], **c[1]), commands))


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    """The `error:` lines of a refused command line, checked to be all of stderr, with status 2."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), proc.stderr
    return [line.removeprefix("error: ") for line in lines]


def test_help_has_one_shape_for_every_stage():
    for command, proc in zip(HELPS, runs(*((c + ("--help",), {}) for c in HELPS))):
        assert proc.returncode == 0 and proc.stderr == "", (command, proc.stderr[-2000:])
        lines = proc.stdout.splitlines()
        assert lines[0].startswith(f"usage: python -m {' '.join(command)} "), (command, lines[0])
        assert lines[0].endswith("[options]") and lines[1] == "" and lines[2], (command, lines[:3])
        sections = [i for i, line in enumerate(lines) if line in ("options:", "commands:")]
        assert sections and lines[sections[0] - 1] == "", command
        body = [line for line in lines[sections[0]:] if line not in ("", "options:", "commands:")]
        assert all(ENTRY.match(line) or MORE.match(line) for line in body), (command, body)
        assert lines[-1].startswith("  -h, --help") and "options:" in lines, command
        for flag in re.findall(r"(--[a-z-]+) \S+ ", lines[0]):  # each option usage asks for is marked required
            entry = next(i for i, line in enumerate(lines) if line.startswith(f"  {flag} "))
            assert "required" in " ".join(lines[entry:entry + 4]), (command, flag)


def test_a_variable_sets_a_value_and_the_option_wins(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("[train]\nlr = -1\n")
    b.write_text("[lora]\nr = 0\n")
    env_only, both, train_both, export_env, export_both = runs(
        (("serve", "--model", str(tmp_path / "m.gguf")), {"AEGIS_PORT": "99999"}),
        (("serve", "--port", "8123", "--model", str(tmp_path / "m.gguf")), {"AEGIS_PORT": "99999"}),
        (("train", "--config", str(b), "--run-dir", str(tmp_path / "run")), {"AEGIS_CONFIG": str(a)}),
        (("export", "all"), {"AEGIS_RUN": str(tmp_path / "nowhere")}),
        (("export", "all", "--run", str(tmp_path / "here")), {"AEGIS_RUN": str(tmp_path / "nowhere")}))
    assert "--port '99999' (from AEGIS_PORT): not a TCP port" in errors(env_only)
    assert not [line for line in errors(both) if "--port" in line]  # the option's 8123 is used, not the variable
    assert errors(train_both) == [f"{b}:2: lora.r: must be > 0, got 0"]  # --config's file, not AEGIS_CONFIG's
    assert errors(export_env) == [f"--run {tmp_path / 'nowhere'} (from AEGIS_RUN): no such directory"]
    assert errors(export_both) == [f"--run {tmp_path / 'here'}: no such directory"]
    # the variable alone sets the value: AEGIS_CONFIG names the recipe
    only = run("train", "--run-dir", str(tmp_path / "run"), AEGIS_CONFIG=str(a))
    assert errors(only) == [f"{a}:2: train.lr: must be > 0, got -1.0"]


def test_every_bad_argument_is_reported_at_once(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nbase = "embedded"\n[soul]\nmix = "blend"\n')
    train, export, serve = runs(
        (("train", "--config", str(recipe), "--bogus", "--set", "lora.r=0", "--resume", "--overwrite",
          "--no-progress=1", "stray"), {}),
        (("export", "gguf", "--model", str(tmp_path), "--out", str(tmp_path / "x.bin"), "--type", "q3",
          "--threads", "none", "--nam", "x"), {}),
        (("serve", "--port", "0", "--parallel", "-1", "--timeout", "soon", "--backend", "vllm", "--log-level"), {}))
    assert sorted(errors(train)) == sorted([
        "--bogus: unknown option", "--no-progress: a switch, it takes no value",
        "'stray': unexpected word (each value follows its option)", "--run-dir: required (or set AEGIS_RUN_DIR)",
        "--resume, --overwrite: give one or the other", f"{recipe}:4: soul.mix: 'blend' is not one of "
        "interpolate, residual", "--set lora.r: must be > 0, got 0"])
    lines = errors(export)
    assert len(lines) == 5, lines
    for start in (f"--model {tmp_path}: not a Hugging Face model directory", f"--out {tmp_path / 'x.bin'}: should "
                  "end in .gguf", "--type 'q3': unknown (known: f32, f16", "--threads 'none': not an integer",
                  "--nam: unknown option (did you mean --name?)"):
        assert any(line.startswith(start) for line in lines), (start, lines)
    assert sorted(errors(serve)) == sorted([
        "--port '0': not a TCP port", "--parallel '-1': must be >= 0", "--timeout 'soon': not a number",
        "--backend 'vllm': unknown (known: auto, llamacpp, hf)", "--log-level: needs a value (LOG_LEVEL)",
        "--model: required (or set AEGIS_MODEL)"])
    assert errors(run("export")) == ["COMMAND: required first (one of merge, gguf, parity, modelfile, ollama, all); "
                                     "see python -m export --help"]


@dataclass
class Example:
    """An example command."""

    name: str = setting("x", "a name", env="AEGIS_TEST_NAME")
    sizes: list[int] = setting((1,), "sizes", repeat=True, commas=True, parse=cli.bounded(int, 1))
    path: Path | None = setting(None, "a path", required=True)


def test_the_rules_in_process():
    """An option given twice keeps its last value; an empty variable counts as unset; commas split a repeated
    option; a required option left out leaves None for problems() and is reported."""
    got = cli.parse(Example, ["--name", "a", "--name=b", "--sizes", "2,3", "--sizes", "4", "--path", "p"], prog="x",
                    environ={"AEGIS_TEST_NAME": "env"})
    assert (got.name, got.sizes, got.path) == ("b", [2, 3, 4], Path("p"))
    got = cli.parse(Example, ["--path", "p"], prog="x", environ={"AEGIS_TEST_NAME": ""})
    assert (got.name, got.sizes) == ("x", [1])
    with pytest.raises(cli.UsageError) as err:
        cli.parse(Example, ["--sizes", "0,a"], prog="x", environ={})
    assert err.value.problems == ["--sizes '0': must be >= 1", "--sizes 'a': not an integer", "--path: required"]
    with pytest.raises(cli.Help) as shown:
        cli.parse(Example, ["--bogus", "-h"], prog="python -m example", environ={})
    assert str(shown.value).startswith("usage: python -m example --path PATH [options]\n\nAn example command.\n")
