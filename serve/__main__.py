"""python -m serve --model [NAME=]PATH [--model ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--parallel N]

Serves an OpenAI-compatible API; `python -m serve --help` says how. Every option is a field of serve.config.Settings.
"""

from __future__ import annotations

import logging
import sys

from aegis import cli
from aegis.errors import AegisError

from .app import create_app
from .config import Settings, read
from .registry import verify_files
from .server import make


def serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.no_verify:
        verify_files(settings.files())  # a DigestError names the file and --no-verify

    failed: list[BaseException] = []
    server = None

    def on_load_error(e: BaseException) -> None:
        # a server that can never become ready should say so and exit, not answer 503 forever
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_error=on_load_error)
    server = make(app, settings)
    logging.getLogger("serve").info(
        "serving %s on http://%s:%d/v1 (key %s)",
        ", ".join(s.name for s in settings.models),
        settings.host,
        settings.port,
        "required" if settings.api_key else "not required",
    )
    server.run()
    if failed:
        raise AegisError(f"could not load the model: {failed[0]}")


def main(argv: list[str] | None = None) -> int:
    return cli.main(lambda: serve(read(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
