"""python -m serve --model [NAME=]PATH [--model ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--workers N]

Serves an OpenAI-compatible API. PATH is a GGUF file (llama.cpp), a merged model directory or a training checkpoint
(transformers). The server answers /health at once and the API once the models are loaded (503 before).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .backends import KINDS, detect
from .config import ModelSpec, Settings, parse_model_arg


def _positive(kind):
    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value
    return check


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                    help="a GGUF file, a merged model directory or a training checkpoint; repeat to serve several "
                         "(the first is the default); NAME is the id clients use (default: from the path)")
    ap.add_argument("--backend", choices=KINDS, default="auto",
                    help="auto: llama.cpp for GGUF files, transformers for directories")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1 (default: $AEGIS_API_KEY, else no key)")
    ap.add_argument("--workers", type=_positive(int), default=1,
                    help="model workers per model (each has its own llama.cpp context)")
    ap.add_argument("--queue-size", type=_non_negative, default=64,
                    help="requests that may wait for a worker before the server answers 429")
    ap.add_argument("--timeout", type=_positive(float), default=300.0, help="seconds per request, queue included")
    ap.add_argument("--max-body", type=_positive(int), default=1 << 20, metavar="BYTES",
                    help="largest request body (413 beyond)")
    ap.add_argument("--ctx-size", type=_non_negative, default=0,
                    help="context length (0: the model's own; llama.cpp caps that at 4096)")
    ap.add_argument("--max-tokens-default", type=_non_negative, default=0,
                    help="max_tokens for chat requests that give none (0: the rest of the context)")
    ap.add_argument("--threads", type=_non_negative, default=0,
                    help="llama.cpp threads per worker (0: half the cores, split among the workers)")
    ap.add_argument("--gpu-layers", type=int, default=-1, help="llama.cpp layers to offload (-1: all, if a GPU)")
    ap.add_argument("--device", default="auto", help="transformers backend: auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="transformers backend compute dtype")
    ap.add_argument("--quantization", choices=["nf4", "none"], default=None,
                    help="transformers backend, training checkpoints: load the base in 4-bit or not "
                         "(default: as trained)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap


def settings_from(args: argparse.Namespace, ap: argparse.ArgumentParser) -> Settings:
    specs = []
    for text in args.model:
        spec = parse_model_arg(text)
        if not spec.path.exists():
            ap.error(f"--model {text}: {spec.path} does not exist")
        if args.backend == "auto":
            try:
                detect(spec.path)  # a wrong kind of file fails here, not after the server has started
            except (ValueError, OSError) as e:
                ap.error(f"--model {text}: {e}")
        specs.append(ModelSpec(spec.name, spec.path, args.backend))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        ap.error(f"--model: two models share a name ({', '.join(names)}); name them with NAME=PATH")
    if not 0 < args.port < 65536:
        ap.error(f"--port {args.port}: not a TCP port")
    key = args.api_key if args.api_key is not None else os.environ.get("AEGIS_API_KEY") or None
    return Settings(models=specs, api_key=key, workers=args.workers, queue_size=args.queue_size,
                    timeout=args.timeout, max_body_bytes=args.max_body, ctx_size=args.ctx_size,
                    threads=args.threads, gpu_layers=args.gpu_layers, device=args.device, dtype=args.dtype,
                    quantization=args.quantization, default_max_tokens=args.max_tokens_default)


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    settings = settings_from(args, ap)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from .app import create_app

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(e: BaseException) -> None:
        # a server that can never become ready should say so and exit, not answer 503 forever
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_error=on_load_error)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    where = f"http://{args.host}:{args.port}"
    logging.getLogger("serve").info("serving %s on %s/v1 (key %s)", ", ".join(s.name for s in settings.models),
                                    where, "required" if settings.api_key else "not required")
    server.run()
    if failed:
        print(f"error: could not load the model: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
