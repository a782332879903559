"""python -m train --config FILE --run-dir DIR [--set section.key=value ...] [--resume | --overwrite]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aegis.config import load
from aegis.errors import AegisError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train", description="Train LoRA + the soul on the α schedule.")
    ap.add_argument("--config", required=True, type=Path, help="TOML file (see configs/)")
    ap.add_argument("--run-dir", required=True, type=Path, help="where config, metrics and checkpoints go")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config value (repeatable)")
    start = ap.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --run-dir from its newest checkpoint that verifies")
    start.add_argument("--overwrite", action="store_true",
                       help="delete the run already in --run-dir (checkpoints, metrics, export) and start clean")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
    except AegisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the loop brings torch and transformers with it: a config error is reported before they load
    from .loop import run
    try:
        run(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except AegisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # left to interpreter exit, the group's threads can abort the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
