"""Fixtures the API test modules share by importing them: one server per module on the test run's GGUF (served
as "tiny"), and the official openai client for it."""

from __future__ import annotations

import openai
import pytest

from . import serving


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    with serving.tiny_server(request, tmp_path_factory) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return serving.openai_client(server)
