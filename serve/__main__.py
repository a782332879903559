"""python -m serve --model [NAME=]PATH [--model ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--parallel N]

Serves an OpenAI-compatible API. PATH is a GGUF file (llama.cpp), a merged model directory or a training checkpoint
(transformers); a GGUF must match the NAME.gguf.sha256 export wrote beside it (--no-verify for a file from
elsewhere). The server answers /health at once and the API once the models are loaded (503 before). SIGTERM or
Ctrl-C drains it: /ready and new requests answer 503 while the requests in flight get --shutdown-grace seconds to
finish. Every option is a field of serve.config.Settings.
"""

from __future__ import annotations

import logging
import sys

from aegis.digest import DigestError

from .app import create_app
from .config import parser, settings_from
from .registry import verify_files
from .server import make


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0])
    settings = settings_from(ap.parse_args(argv), ap)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.no_verify:
        try:
            verify_files(settings.models)
        except DigestError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    failed: list[BaseException] = []
    server = None

    def on_load_error(e: BaseException) -> None:
        # a server that can never become ready should say so and exit, not answer 503 forever
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_error=on_load_error)
    server = make(app, settings)
    logging.getLogger("serve").info("serving %s on http://%s:%d/v1 (key %s)",
                                    ", ".join(s.name for s in settings.models), settings.host, settings.port,
                                    "required" if settings.api_key else "not required")
    server.run()
    if failed:
        print(f"error: could not load the model: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
