"""Create an Ollama model from an exported GGUF with the `ollama` client, at --host, else OLLAMA_HOST, else
http://127.0.0.1:11434: the GGUF is uploaded as a blob, then the model is created from that file with the template,
stops, num_ctx and system prompt that `modelfile.build` derived and proved (the same that the Modelfile holds)."""

from __future__ import annotations

import re

from .files import ExportError
from .modelfile import Modelfile

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*(:[A-Za-z0-9_][A-Za-z0-9._-]*)?$")


def check_name(name: str) -> None:
    if not NAME.match(name):
        raise ExportError(
            f"--name {name!r}: an Ollama model name is letters, digits, '.', '_', '-' (with optional "
            f"namespace/ and :tag)"
        )


def create(mf: Modelfile, name: str, host: str | None = None, log=print) -> None:
    """Create model `name` on the Ollama server from `mf` (its GGUF, template and parameters)."""
    import ollama

    check_name(name)
    client = ollama.Client(host=host)
    where = host or "OLLAMA_HOST"
    try:
        log(f"ollama: uploading {mf.gguf.name} ({mf.gguf.stat().st_size / 2**20:.1f} MiB)")
        digest = client.create_blob(mf.gguf)
        last = None
        for progress in client.create(
            model=name,
            files={mf.gguf.name: digest},
            template=mf.template,
            system=mf.system,
            parameters=mf.parameters,
            stream=True,
        ):
            last = progress.status
            log(f"ollama: {last}")
    except ConnectionError as e:
        raise ExportError(
            f"no Ollama server answering ({where}): {e}; start `ollama serve`, or pass --host / set "
            f"OLLAMA_HOST to where one runs"
        ) from None
    except ollama.ResponseError as e:
        raise ExportError(f"Ollama could not create {name}: {e.error} (status {e.status_code})") from None
    if last != "success":
        raise ExportError(f"Ollama's create ended without success (last status {last!r})")
    log(f"ollama: created {name}")
