"""Property-based fuzzing of the API from its own OpenAPI schema with schemathesis' CLI: valid and invalid bodies
(positive and negative generation), edge cases of every field, odd headers and methods. The server must never
answer 5xx and must be alive afterwards. Bounded (a few dozen cases per operation and a time cap); README.md ("Serving")
gives the longer run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from support import serving
from support.fixtures import served_files  # noqa: F401 - a fixture
from support.serving import Server

KEY = "fuzz-key"
MODEL = "tiny"


@pytest.fixture(scope="module")
def fuzz_server(served_files, tmp_path_factory):
    gguf, _ = served_files
    log = tmp_path_factory.mktemp("serve") / "fuzz.log"
    limits = ("--threads", "1", "--timeout", "20", "--max-tokens-default", "64")
    with Server("--model", f"{MODEL}={gguf}", *limits, api_key=KEY, log_path=log) as s:
        yield s


def schemathesis_cli() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    if exe.exists():
        return [str(exe)]
    if shutil.which("schemathesis"):
        return ["schemathesis"]
    pytest.skip("schemathesis is not installed")


def test_fuzzing_finds_no_server_errors(fuzz_server, tmp_path):
    cmd = [
        *schemathesis_cli(),
        "run",
        fuzz_server.url + "/schema/openapi.json",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "--seed",
        "20260101",
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--no-color",
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.support.fuzz_hooks",
        "AEGIS_FUZZ_MODEL": MODEL,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(serving.REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    report = done.stdout[-4000:] + done.stderr[-2000:]
    (tmp_path / "schemathesis.log").write_text(done.stdout + done.stderr)
    print(report)
    assert done.returncode == 0, report
    assert " passed" in done.stdout and "generated" in done.stdout, report
    assert fuzz_server.alive(), fuzz_server.log()
    assert httpx.get(fuzz_server.url + "/ready").status_code == 200
    # the fuzzer got past validation into generation, not only into 4xx paths
    metrics = httpx.get(fuzz_server.url + "/metrics").text
    print(
        "\n".join(
            line
            for line in metrics.splitlines()
            if line.startswith(("aegis_requests_total", "aegis_generations_total", "aegis_completion_tokens_total"))
        )
    )
    assert 'aegis_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert 'aegis_requests_total{endpoint="/v1/completions",status="200"}' in metrics
