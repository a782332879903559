"""The README's two commands are the ones CI and users run, and do everything on a fresh machine; its first screen
leads to the chat page; its examples and links work against what the commands make."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from test_docs import doc_texts, split_doc

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FIRST_SCREEN = "\n".join(README.splitlines()[:50])


def _commands() -> list[str]:
    section = README.split("## Two commands for a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, re.S)


def _make(target: str) -> list[str]:
    """What `make TARGET` runs on a fresh clone, as make itself expands it (nothing is run)."""
    proc = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.replace("\\\n", " ").splitlines()


def _index(lines: list[str], pattern: str) -> int:
    found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert found, f"no step matches {pattern!r} in:\n" + "\n".join(lines)
    return found[0]


def _set_up_in_order(lines: list[str]) -> int:
    venv = _index(lines, r"^python3 -m venv \.venv$")
    torch = _index(lines, r"^\.venv/bin/pip install -c requirements\.lock torch$")
    project = _index(lines, r"^\.venv/bin/pip install -c requirements\.lock -e '\.\[all\]'$")
    assert venv < torch < project  # torch first, pinned by the lock, so pip takes the CPU build
    return project


def test_the_two_commands_are_make_targets_and_ci_runs_the_test_one():
    demo, tests = _commands()
    assert (demo, tests) == ("make demo", "make test")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci  # a command of its own, not a comment
    lines = _make("test")
    assert _index(lines, r"^\.venv/bin/python -m pytest -q$") > _set_up_in_order(lines)


def _served(line: str) -> list[str]:
    """The model names a `python -m serve` line serves, in order: NAME=PATH, or PATH under its file's stem."""
    args = shlex.split(line.split("-m serve ", 1)[1].split("&", 1)[0], comments=True)
    return [spec.rpartition("=")[0] or Path(spec).stem for flag, spec in zip(args, args[1:]) if flag == "--model"]


def test_demo_sets_up_trains_exports_and_serves_the_trained_model_first():
    from export.pipeline import model_name

    lines = _make("demo")
    project = _set_up_in_order(lines)
    train = _index(lines, r"-m train --config configs/quickstart\.toml --run-dir runs/quickstart( |$)")
    export = _index(lines, r"-m export all --run runs/quickstart$")
    base = _index(lines, r"-m export gguf --model \"\$\(\.venv/bin/python -m aegis\.tiny\)\" --out (\S+)")
    serve = _index(lines, r"-m serve --model ")
    ui = _index(lines, r"-m serve\.ui --api http://127\.0\.0\.1:8000/v1 --runs runs$")
    assert project < train < export < serve and project < base < serve and serve <= ui
    assert (ROOT / "configs" / "quickstart.toml").is_file()
    # the GGUF served first is the one `export all` writes for the run; base is the file the base step writes
    trained = f"runs/quickstart/export/{model_name(Path('runs/quickstart'))}-q8_0.gguf"
    base_file = re.search(r"--out (\S+)", lines[base]).group(1)
    assert f"--model {trained} --model base={base_file}" in lines[serve]
    assert _served(lines[serve]) == ["quickstart-q8_0", "base"]


def test_the_first_screen_leads_to_a_streamed_reply_in_the_chat_page():
    """No step outside the first screen: what to install, the command, the page, the model picked, what to type."""
    assert "apt-get install python3-venv build-essential" in FIRST_SCREEN
    assert "```bash\nmake demo\n```" in FIRST_SCREEN
    assert "http://127.0.0.1:7860" in FIRST_SCREEN and "streams" in FIRST_SCREEN
    first = _served(_make("demo")[_index(_make("demo"), r"-m serve --model ")])[0]
    assert f"`{first}`" in FIRST_SCREEN  # the model the page starts on: the first the server lists


def test_readme_is_short():
    assert len(README.splitlines()) <= 200


def test_api_examples_name_a_model_the_doc_serves():
    """In each doc that starts a server, the API examples ask for a model that server serves."""
    checked = []
    for doc, text in doc_texts().items():
        spans, lines = split_doc(text)
        served = {name for line in lines + spans if "-m serve --model " in line for name in _served(line)}
        if not served:
            continue
        code = "\n".join(re.findall(r"```\w*\n(.+?)\n```", text, re.S))
        used = set(
            re.findall(r'"model":\s*"([^"]+)"', code)
            + re.findall(r'model="([^"]+)"', code)
            + re.findall(r'^MODEL = "([^"]+)"', code, re.M)
        )
        assert used <= served, (doc, used - served)
        checked.append((doc, len(used)))
    assert dict(checked).get("README.md", 0) >= 1 and dict(checked).get("docs/serving.md", 0) >= 1, checked


def _anchors(path: Path) -> set[str]:
    from markdown.extensions.toc import slugify  # the ids mkdocs gives headings

    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slugify(h.strip(), "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_relative_link_and_anchor_resolves():
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [u for u in links if not re.match(r"[a-z]+:|#", u)]
    assert local
    for link in local:
        target, _, anchor = link.partition("#")
        assert (ROOT / target).exists(), link
        assert not anchor or anchor in _anchors(ROOT / target), link


def test_the_readme_links_every_page_of_the_docs():
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}


@pytest.mark.parametrize("doc", sorted(doc_texts()))
def test_gguf_paths_belong_to_runs_the_doc_makes(doc):
    from export.pipeline import model_name

    text = doc_texts()[doc]
    for run, stem in re.findall(r"runs/([\w.-]+)/export/([\w.-]+)\.gguf", text):
        assert f"--run-dir runs/{run}" in text and f"export all --run runs/{run}" in text, (doc, run)
        # the GGUF's stem is the model's name: --name where the doc's export of that run gives one
        named = re.findall(rf"export all --run runs/{re.escape(run)}\b[^\n]*--name ([\w.-]+)", text)
        names = set(named) or {model_name(Path("runs") / run)}
        assert any(stem.startswith(n + "-") for n in names), (doc, run, stem, names)
