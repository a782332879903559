"""README's section for app developers runs as written: its Python blocks, one after another, against a real server
that serves the test run's GGUF under the name the README's command gives the quickstart model."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from support import serving
from support.serving import REPO

SECTION = "### For app developers"


def section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split(SECTION, 1)[1].split("\n### ", 1)[0]


def test_the_command_serves_the_quickstart_model_under_the_name_the_examples_use():
    bash = re.findall(r"```bash\n(.+?)\n```", section(), re.S)
    assert bash and "python -m serve --model runs/quickstart/export/quickstart-q8_0.gguf" in bash[0]
    assert 'MODEL = "quickstart-q8_0"' in section()


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    with serving.tiny_server(request, tmp_path_factory, name="quickstart-q8_0") as s:
        yield s


def test_the_examples_run(server):
    blocks = re.findall(r"```python\n(.+?)\n```", section(), re.S)
    assert len(blocks) >= 4
    code = "\n\n".join(blocks).replace("http://127.0.0.1:8000/v1", server.api)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - our own README
    printed = out.getvalue()
    assert re.search(r"^(東京|大阪|札幌) \d+ [A-Z]{3}-\d{3}$", printed, re.M), printed  # the schema's trip
    assert re.search(r"^streamed call call_\w+ get_weather$", printed, re.M), printed
    assert "CompletionUsage(" in printed
