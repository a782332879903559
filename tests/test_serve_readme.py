"""The OpenAI SDK examples run as written against a real server that serves the test run's GGUF under the names the
docs' commands give it: docs/serving.md's section for app developers (its Python blocks, one after another), and
every other Python block of docs/serving.md and the README, each on its own."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from support import serving
from support.serving import REPO

SERVING = REPO / "docs" / "serving.md"
SECTION = "## For app developers"
PYTHON = re.compile(r"```python\n(.+?)\n```", re.S)


def section() -> str:
    return SERVING.read_text(encoding="utf-8").split(SECTION, 1)[1].split("\n## ", 1)[0]


def test_the_command_serves_the_quickstart_model_under_the_name_the_examples_use():
    bash = re.findall(r"```bash\n(.+?)\n```", section(), re.S)
    assert bash and "python -m serve --model runs/quickstart/export/quickstart-q8_0.gguf" in bash[0]
    assert 'MODEL = "quickstart-q8_0"' in section()


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    gguf, _ = serving.served_files(request)
    # the README's tour serves its run as tour-q8_0; the same weights under both names
    with serving.tiny_server(request, tmp_path_factory, "--model", f"tour-q8_0={gguf}", name="quickstart-q8_0") as s:
        yield s


def run(code: str, server) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(
            compile(code.replace("http://127.0.0.1:8000/v1", server.api), "docs", "exec"),  # noqa: S102 - our docs
            {"__name__": "docs"},
        )
    return out.getvalue()


def test_the_examples_for_app_developers_run(server):
    blocks = PYTHON.findall(section())
    assert len(blocks) >= 4
    printed = run("\n\n".join(blocks), server)
    assert re.search(r"^(東京|大阪|札幌) \d+ [A-Z]{3}-\d{3}$", printed, re.M), printed  # the schema's trip
    assert re.search(r"^streamed call call_\w+ get_weather$", printed, re.M), printed
    assert "CompletionUsage(" in printed


def test_the_other_sdk_examples_run(server):
    blocks = PYTHON.findall(SERVING.read_text(encoding="utf-8").replace(section(), "")) + PYTHON.findall(
        (REPO / "README.md").read_text(encoding="utf-8")
    )
    assert len(blocks) >= 2
    for code in blocks:
        run(code, server)  # an unknown model name, a wrong field or a refused request raises here
