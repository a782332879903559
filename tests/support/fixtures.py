"""Fixtures the API test modules share by importing them: the test run's served files, one server per module on its
GGUF (served as "tiny"), and the official openai client for it."""

from __future__ import annotations

import openai
import pytest

from . import serving


@pytest.fixture(scope="session")
def served_files(request):
    """(GGUF, tokenizer directory) of the exported test run, found once per test session."""
    return serving.served_files(request)


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    with serving.tiny_server(request, tmp_path_factory) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return serving.openai_client(server)
