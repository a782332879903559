"""The one command-line pattern (aegis/cli.py), proved on the real processes of every entry point (the stages
`python -m train|export|serve` and the tools beside them: train.chat, train.eval, train.monitor, train.chat_quality,
serve.ui, aegis.tiny, aegis.llamacpp): the same --help shape, a variable and an option both setting a value (the
option wins), and every bad argument reported at once, one `error:` line each, exit status 2, no traceback."""

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
TOOLS = [
    ("train.chat",),
    ("train.eval",),
    ("train.monitor",),
    ("train.chat_quality",),
    ("serve.ui",),
    ("aegis.tiny",),
    ("aegis.llamacpp",),
    ("aegis.llamacpp", "probe"),
]
HELPS = [
    ("train",),
    ("serve",),
    ("export",),
    *(("export", c) for c in ("merge", "gguf", "parity", "modelfile", "ollama", "all")),
    *TOOLS,
]
ENTRY = re.compile(r"^  (-h, --help|--[a-z][a-z-]*|[a-z]+|[A-Z][A-Z_]*)( \S+)?(\s{2,}\S.*)?$")  # option, command
MORE = re.compile(r"^ {28}\S")  # an entry's text, continued


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AEGIS_")} | env
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300
    )


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


def test_help_has_one_shape_for_every_entry_point():
    for command, proc in zip(HELPS, runs(*((c + ("--help",), {}) for c in HELPS))):
        assert proc.returncode == 0 and proc.stderr == "", (command, proc.stderr[-2000:])
        lines = proc.stdout.splitlines()
        assert lines[0].startswith(f"usage: python -m {' '.join(command)} "), (command, lines[0])
        assert lines[0].endswith("[options]") and lines[1] == "" and lines[2], (command, lines[:3])
        sections = [i for i, line in enumerate(lines) if line in ("options:", "commands:")]
        assert sections and lines[sections[0] - 1] == "", command
        body = [line for line in lines[sections[0] :] if line not in ("", "options:", "commands:")]
        assert all(ENTRY.match(line) or MORE.match(line) for line in body), (command, body)
        assert [line for line in body if ENTRY.match(line)][-1].startswith("  -h, --help"), command
        assert "options:" in lines, command
        for flag in re.findall(r"(--[a-z-]+ \S+|\b(?!COMMAND)[A-Z][A-Z_]+) ", lines[0]):  # each one usage asks for
            entry = next(i for i, line in enumerate(lines) if line.startswith(f"  {flag.split()[0]} "))
            assert "required" in " ".join(lines[entry : entry + 4]), (command, flag)  # is marked required


def test_a_variable_sets_a_value_and_the_option_wins(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("[train]\nlr = -1\n")
    b.write_text("[lora]\nr = 0\n")
    env_only, both, train_both, export_env, export_both = runs(
        (("serve", "--model", str(tmp_path / "m.gguf")), {"AEGIS_PORT": "99999"}),
        (("serve", "--port", "8123", "--model", str(tmp_path / "m.gguf")), {"AEGIS_PORT": "99999"}),
        (("train", "--config", str(b), "--run-dir", str(tmp_path / "run")), {"AEGIS_CONFIG": str(a)}),
        (("export", "all"), {"AEGIS_RUN": str(tmp_path / "nowhere")}),
        (("export", "all", "--run", str(tmp_path / "here")), {"AEGIS_RUN": str(tmp_path / "nowhere")}),
    )
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
        (
            (
                "train",
                "--config",
                str(recipe),
                "--bogus",
                "--set",
                "lora.r=0",
                "--resume",
                "--overwrite",
                "--no-progress=1",
                "stray",
            ),
            {},
        ),
        (
            (
                "export",
                "gguf",
                "--model",
                str(tmp_path),
                "--out",
                str(tmp_path / "x.bin"),
                "--type",
                "q3",
                "--threads",
                "none",
                "--nam",
                "x",
            ),
            {},
        ),
        (("serve", "--port", "0", "--parallel", "-1", "--timeout", "soon", "--backend", "vllm", "--log-level"), {}),
    )
    assert sorted(errors(train)) == sorted(
        [
            "--bogus: unknown option",
            "--no-progress: a switch, it takes no value",
            "'stray': unexpected word (each value follows its option)",
            "--run-dir: required (or set AEGIS_RUN_DIR)",
            "--resume, --overwrite: give one or the other",
            f"{recipe}:4: soul.mix: 'blend' is not one of interpolate, residual",
            "--set lora.r: must be > 0, got 0",
        ]
    )
    lines = errors(export)
    assert len(lines) == 5, lines
    for start in (
        f"--model {tmp_path}: not a Hugging Face model directory",
        f"--out {tmp_path / 'x.bin'}: should end in .gguf",
        "--type 'q3': unknown (known: f32, f16",
        "--threads 'none': not an integer",
        "--nam: unknown option (did you mean --name?)",
    ):
        assert any(line.startswith(start) for line in lines), (start, lines)
    assert sorted(errors(serve)) == sorted(
        [
            "--port '0': not a TCP port",
            "--parallel '-1': must be >= 0",
            "--timeout 'soon': not a number",
            "--backend 'vllm': unknown (known: auto, llamacpp, hf)",
            "--log-level: needs a value (LOG_LEVEL)",
            "--model: required (or set AEGIS_MODEL)",
        ]
    )
    assert errors(run("export")) == [
        "COMMAND: required first (one of merge, gguf, parity, modelfile, ollama, all); see python -m export --help"
    ]


def test_a_bad_value_of_each_tool_is_one_line_naming_its_option(tmp_path):
    nowhere = str(tmp_path / "nowhere")  # loading says what is wrong with it, after the options are checked
    cases = {
        ("train.chat", "--checkpoint", nowhere, "--top-p", "2"): "--top-p '2': must be in (0, 1]",
        ("train.eval", "--checkpoint", nowhere, "--batch-size", "0"): "--batch-size '0': must be >= 1",
        ("train.monitor", str(tmp_path), "--interval", "0"): "--interval '0': must be > 0",
        ("train.chat_quality", "--max-new-tokens", "x"): "--max-new-tokens 'x': not an integer",
        ("serve.ui", "--port", "70000"): "--port '70000': not a TCP port",
        ("aegis.tiny", "--out"): "--out: needs a value (DIR)",
        ("aegis.llamacpp", "probe", "x.gguf", "--threads", "0"): "--threads '0': must be >= 1",
        ("aegis.llamacpp", "check"): "'check': unknown command (known: probe)",
    }
    for args, proc in zip(cases, runs(*((args, {}) for args in cases))):
        assert errors(proc) == [cases[args]], args
    assert errors(run("train.monitor", str(tmp_path), "stray")) == [
        "'stray': unexpected word (each value follows its option)"
    ]


def test_each_tool_reads_its_variables_and_its_options_win(tmp_path):
    """A variable's value is checked as its option's and named with it; given both, the option is used."""
    file, nowhere = tmp_path / "f.toml", tmp_path / "nowhere"
    file.write_text("")
    bad = {
        "AEGIS_API": "ftp://x",
        "AEGIS_RUNS": str(nowhere),
        "AEGIS_CHECKPOINT": str(tmp_path),
        "AEGIS_RUN_DIR": str(file),
    }
    chat, evals, quality, monitor, monitor_arg, ui, ui_args = runs(
        (("train.chat", "--prompt", "x"), bad),
        (("train.eval",), {"AEGIS_CHECKPOINT": str(nowhere)}),
        (("train.chat_quality", "--show", "-1"), {"AEGIS_CHECKPOINT": str(nowhere)}),
        (("train.monitor", "--once"), bad),
        (("train.monitor", str(nowhere), "--width", "1"), bad),
        (("serve.ui", "--port", "0"), bad),
        (("serve.ui", "--port", "0", "--api", "http://127.0.0.1:1/v1", "--runs", str(tmp_path)), bad),
    )
    assert errors(chat) == [
        f"--checkpoint {tmp_path} (from AEGIS_CHECKPOINT): neither a checkpoint nor a run "
        "directory; pass RUN_DIR, RUN_DIR/final or RUN_DIR/checkpoints/step_N"
    ]
    assert errors(evals) == [f"{nowhere}: no such checkpoint directory"]
    assert errors(quality) == ["--show '-1': must be >= 0"]  # the variable's path is checked when it is loaded
    assert errors(monitor) == [f"RUN_DIR {file}: a file, not a run directory"]
    assert errors(monitor_arg) == ["--width '1': must be >= 40"]  # RUN_DIR given: the variable's file is not read
    assert errors(ui) == [
        "--api 'ftp://x' (from AEGIS_API): expected a URL like http://127.0.0.1:8000/v1",
        f"--runs {nowhere} (from AEGIS_RUNS): not a directory",
        "--port '0': not a TCP port",
    ]
    assert errors(ui_args) == ["--port '0': not a TCP port"]
    from serve import ui as page

    assert cli.parse(page.Args, [], prog="x", environ={"AEGIS_API_KEY": "k"}).api_key == "k"


@dataclass
class Example:
    """An example command."""

    name: str = setting("x", "a name", env="AEGIS_TEST_NAME")
    sizes: list[int] = setting((1,), "sizes", repeat=True, commas=True, parse=cli.bounded(int, 1))
    path: Path | None = setting(None, "a path", required=True)


@dataclass
class Bare:
    """A command with bare words."""

    run: Path = setting(help="a run", metavar="RUN", env="AEGIS_TEST_RUN", positional=True, required=True)
    other: str | None = setting(None, "another", positional=True)
    once: bool = setting(False, "a switch")


def test_the_rules_in_process():
    """An option given twice keeps its last value; an empty variable counts as unset; commas split a repeated
    option; a required option left out leaves None for problems() and is reported."""
    got = cli.parse(
        Example,
        ["--name", "a", "--name=b", "--sizes", "2,3", "--sizes", "4", "--path", "p"],
        prog="x",
        environ={"AEGIS_TEST_NAME": "env"},
    )
    assert (got.name, got.sizes, got.path) == ("b", [2, 3, 4], Path("p"))
    got = cli.parse(Example, ["--path", "p"], prog="x", environ={"AEGIS_TEST_NAME": ""})
    assert (got.name, got.sizes) == ("x", [1])
    with pytest.raises(cli.UsageError) as err:
        cli.parse(Example, ["--sizes", "0,a"], prog="x", environ={})
    assert err.value.problems == ["--sizes '0': must be >= 1", "--sizes 'a': not an integer", "--path: required"]
    with pytest.raises(cli.Help) as shown:
        cli.parse(Example, ["--bogus", "-h"], prog="python -m example", environ={})
    assert str(shown.value).startswith("usage: python -m example --path PATH [options]\n\nAn example command.\n")


def test_bare_words_in_process():
    """Bare words fill the positional fields in order, around the options; the variable stands in for a missing
    one; the usage line shows them, the optional one in brackets."""
    got = cli.parse(Bare, ["--once", "r", "o"], prog="x", environ={"AEGIS_TEST_RUN": "env"})
    assert (got.run, got.other, got.once) == (Path("r"), "o", True)
    assert cli.parse(Bare, [], prog="x", environ={"AEGIS_TEST_RUN": "env"}).run == Path("env")
    with pytest.raises(cli.UsageError) as err:
        cli.parse(Bare, ["r", "o", "p"], prog="x", environ={})
    assert err.value.problems == ["'p': unexpected word (each value follows its option)"]
    with pytest.raises(cli.UsageError) as err:
        cli.parse(Bare, [], prog="x", environ={})
    assert err.value.problems == ["RUN: required (or set AEGIS_TEST_RUN)"]
    with pytest.raises(cli.Help) as shown:
        cli.parse(Bare, ["-h"], prog="x", environ={})
    assert str(shown.value).startswith("usage: x RUN [OTHER] [options]\n")
    assert "\n  RUN                       a run (required; env AEGIS_TEST_RUN)\n" in str(shown.value)
