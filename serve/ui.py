"""python -m serve.ui --api http://HOST:8000/v1 [--api-key KEY] [--runs DIR] [--base NAME] [--host 127.0.0.1]
[--port 7860]

A chat front end for the API. It speaks only the OpenAI protocol (models, streamed chat completions), so it works
against any compatible server. Tabs: Chat, Soul monitor (live training metrics of runs under --runs) and Compare
(one prompt to two models side by side; the untrained base, --base, is offered there and not for chatting).
serve/ui_layout.py lays the page out and wires its events; serve/ui_chat.py answers the chat, serve/ui_api.py talks
to the API, serve/ui_monitor.py draws the runs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from aegis import cli
from aegis.cli import setting

from .ui_api import Api
from .ui_layout import build

PROG = "python -m serve.ui"


def _api_url(text: str) -> str:
    url = urlparse(text)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ValueError("expected a URL like http://127.0.0.1:8000/v1")
    return text.rstrip("/")


def _directory(text: str) -> Path:
    if not Path(text).is_dir():
        raise ValueError("not a directory")
    return Path(text)


@dataclass
class Args:
    """The chat page: a Gradio front end that speaks only the OpenAI protocol to the API at --api, with a Soul
    monitor of the training runs under --runs and a Compare tab."""

    api: str = setting(
        "http://127.0.0.1:8000/v1",
        "base URL of an OpenAI-compatible API",
        parse=_api_url,
        metavar="URL",
        env="AEGIS_API",
    )
    api_key: str | None = setting(None, "key for the API", metavar="KEY", env="AEGIS_API_KEY")
    runs: Path | None = setting(
        None, "directory with training runs for the Soul monitor", parse=_directory, metavar="DIR", env="AEGIS_RUNS"
    )
    base: str = setting("base", "name of the served untrained base model, offered only in Compare", metavar="NAME")
    host: str = setting("127.0.0.1", "address to listen on (default: loopback only)")
    port: int = setting(7860, "TCP port", parse=cli.tcp_port)


def launch(args: Args) -> None:
    # nothing may phone home: the page must work offline
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .ui_theme import CSS, STATIC, PagePolicy, theme

    demo = build(Api(args.api, args.api_key, args.base), args.runs)
    demo.queue(default_concurrency_limit=8)
    from starlette.middleware import Middleware

    demo.launch(
        server_name=args.host,
        server_port=args.port,
        theme=theme(),
        css=CSS,
        ssr_mode=False,
        footer_links=[],
        show_error=True,
        quiet=False,
        allowed_paths=[str(STATIC)],
        app_kwargs={"middleware": [Middleware(PagePolicy)]},
    )


def main(argv: list[str] | None = None) -> int:
    return cli.main(lambda: launch(cli.parse(Args, sys.argv[1:] if argv is None else argv, prog=PROG)))


if __name__ == "__main__":
    sys.exit(main())
