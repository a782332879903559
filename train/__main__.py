"""python -m train --config FILE --run-dir DIR [--set section.key=value ...] [--resume | --overwrite]"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from aegis import cli
from aegis.cli import setting
from aegis.config import Config, ConfigError, load
from aegis.errors import ModelError

PROG = "python -m train"


@dataclass
class Args:
    """Train LoRA + the soul on the α schedule. The recipe is a TOML file (configs/*.toml, the keys in
    docs/configuration.md); --set changes one of its values, as TOML (--set train.lr=1e-4)."""

    config: Path = setting(
        help="the TOML recipe, e.g. configs/quickstart.toml", metavar="FILE", env="AEGIS_CONFIG", required=True
    )
    run_dir: Path = setting(
        help="where config, metrics and checkpoints go", metavar="DIR", env="AEGIS_RUN_DIR", required=True
    )
    overrides: list[str] = setting(
        help="override one config value", flag="--set", metavar="SECTION.KEY=VALUE", repeat=True
    )
    resume: bool = setting(False, "continue the run in --run-dir from its newest checkpoint that verifies")
    overwrite: bool = setting(
        False, "delete the run already in --run-dir (checkpoints, metrics, export) and start clean"
    )
    no_progress: bool = setting(False, "no progress bar")

    @cached_property
    def recipe(self) -> Config:
        return load(self.config, self.overrides)

    def problems(self) -> list[str]:
        """The recipe's problems join the command line's, so one run reports both."""
        out = ["--resume, --overwrite: give one or the other"] if self.resume and self.overwrite else []
        if self.config is not None:
            try:
                _ = self.recipe  # loaded here, once, so that its problems join the command line's
            except ConfigError as e:
                out += e.problems
        return out


def train(args: Args) -> None:
    # the loop brings torch and transformers with it: a problem of the command line is reported before they load
    from .data import DataError
    from .loop import run
    from .rundir import RunError
    from .update import NonFiniteError

    try:
        run(args.recipe, args.run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except NonFiniteError:  # the run failed, whatever the user asked
        raise
    except (DataError, ModelError, RunError) as e:  # the data, the base and the run directory the user named
        raise cli.UsageError(str(e).splitlines()) from None
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # left to interpreter exit, the group's threads can abort the process


def main(argv: list[str] | None = None) -> int:
    return cli.main(lambda: train(cli.parse(Args, sys.argv[1:] if argv is None else argv, prog=PROG)))


if __name__ == "__main__":
    sys.exit(main())
