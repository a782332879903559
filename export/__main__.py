"""python -m export {merge,gguf,parity,modelfile,ollama,all} ...  (see README.md, "Export")

Each command is a settings class of aegis/cli.py's pattern: its fields are its options, its docstring its help,
`problems()` what needs more than one option or the file system, `run()` the work."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from aegis import cli
from aegis.atomic import write_json
from aegis.cli import setting

from . import merge, modelfile, names, ollama, parity, pipeline
from .files import unwritable

PROG = "python -m export"
TYPES = ", ".join(names.TYPES)
MODEL_HELP = "merged model directory whose chat template the Modelfile follows (default: merged/ beside the GGUF)"


def _directory(text: str) -> Path:
    if not Path(text).is_dir():
        raise ValueError("no such directory")
    return Path(text)


def _file(text: str) -> Path:
    if not Path(text).is_file():
        raise ValueError("no such file")
    return Path(text)


def _hf_model(text: str) -> Path:
    if not (Path(text) / "config.json").is_file():
        raise ValueError("not a Hugging Face model directory (no config.json)")
    return Path(text)


def _out_dir(text: str) -> Path:
    if Path(text).exists() and not Path(text).is_dir():
        raise ValueError("exists and is not a directory")
    return Path(text)


def _gguf_out(text: str) -> Path:
    if Path(text).suffix != ".gguf":
        raise ValueError("should end in .gguf")
    return Path(text)


def _writable(dest: Path | None) -> list[str]:
    why = unwritable(dest) if dest is not None else None
    return [f"--out {dest}: cannot write there: {why}"] if why else []


class _WritesOut:
    """A command that writes at --out: its problems are that place's."""

    def problems(self) -> list[str]:
        return _writable(self.out)


class _MakesModelfile:
    """A command that makes the Modelfile of --gguf, its template proved against --model's chat template."""

    def build_modelfile(self) -> modelfile.Modelfile:
        return modelfile.build(
            self.gguf,
            modelfile.model_dir_for(self.gguf, self.model),
            system=self.system,
            num_ctx=self.num_ctx,
            name=self.name,
        )


def _threads():
    return setting(None, "llama.cpp threads for the parity check", parse=cli.bounded(int, 1))


def _num_ctx():
    return setting(
        None,
        "the context length Ollama runs it with (default: the GGUF's original one)",
        parse=cli.bounded(int, 0, strict=True),
    )


@dataclass
class Merge(_WritesOut):
    """Merge a checkpoint into a stock HF model: LoRA merged, the soul folded into lm_head."""

    checkpoint: Path = setting(
        help="checkpoint directory (final/ or checkpoints/step_N/)", parse=_directory, metavar="DIR", required=True
    )
    out: Path = setting(
        help="output directory (replaced only if the check passes)", parse=_out_dir, metavar="DIR", required=True
    )
    base: str | None = setting(None, "base model (hub id or directory); default: the one in the checkpoint")
    dtype: str = setting("float32", "merge precision", choices=merge.DTYPES)
    device: str = setting("auto", "auto (CUDA if present), cpu, cuda, cuda:N")
    no_quant_gap: bool = setting(False, "skip measuring the 4-bit training base's gap")

    def run(self) -> int:
        merge.merge(
            self.checkpoint,
            self.out,
            base=self.base,
            dtype=self.dtype,
            device=self.device,
            quant_gap=not self.no_quant_gap,
        )
        return 0


@dataclass
class Gguf(_WritesOut):
    """Write a merged HF model as GGUF, then check its parity with the model."""

    model: Path = setting(help="merged model directory", parse=_hf_model, metavar="DIR", required=True)
    out: Path = setting(help="the GGUF file to write", parse=_gguf_out, metavar="FILE.gguf", required=True)
    out_type: str = setting("f16", f"GGUF type, one of: {TYPES}", flag="--type", choices=names.TYPES, metavar="TYPE")
    name: str | None = setting(None, "general.name (default: the model directory's name)")
    skip_parity: bool = setting(False, "write without the llama.cpp parity check")
    threads: int | None = _threads()
    no_progress: bool = setting(False, "no progress bar")

    def run(self) -> int:
        pipeline.export_gguf(
            self.model,
            self.out,
            self.out_type,
            name=self.name,
            progress=not self.no_progress,
            check_parity=not self.skip_parity,
            threads=self.threads,
        )
        return 0


def _guess_type(path: Path) -> str:
    stem = path.name.lower().removesuffix(".gguf")
    return next((t for t in sorted(names.TYPES, key=len, reverse=True) if stem.endswith(t)), "f16")


@dataclass
class Parity:
    """Compare a GGUF with the merged HF model it was written from (writes parity.json beside the GGUF); exits 1
    when the GGUF is outside its type's bounds."""

    model: Path = setting(help="merged model directory", parse=_hf_model, metavar="DIR", required=True)
    gguf: Path = setting(help="the GGUF file", parse=_file, metavar="FILE", required=True)
    out_type: str | None = setting(
        None,
        "thresholds to apply (default: from the file name, else f16)",
        flag="--type",
        choices=names.TYPES,
        metavar="TYPE",
    )
    threads: int | None = _threads()

    def run(self) -> int:
        report = parity.check(self.model, self.gguf, self.out_type or _guess_type(self.gguf), threads=self.threads)
        print(parity.table(report))
        print(f"written to {parity.record(self.gguf.parent, report)}")
        return 0 if report["passed"] else 1


@dataclass
class Modelfile(_WritesOut, _MakesModelfile):
    """Write an Ollama Modelfile for a GGUF, its chat template proved against the model's own."""

    gguf: Path = setting(help="the GGUF file", parse=_file, metavar="FILE", required=True)
    name: str = setting(help="the model's name", required=True)
    out: Path = setting(help="e.g. modelfiles/NAME.modelfile", metavar="FILE", required=True)
    system: str | None = setting(None, "SYSTEM prompt")
    num_ctx: int | None = _num_ctx()
    model: Path | None = setting(None, MODEL_HELP, parse=_hf_model, metavar="DIR")

    def run(self) -> int:
        modelfile.write(self.build_modelfile(), self.out)
        return 0


@dataclass
class Ollama(_MakesModelfile):
    """Create an Ollama model from a GGUF, through the ollama client."""

    gguf: Path = setting(help="the GGUF file", parse=_file, metavar="FILE", required=True)
    name: str = setting(help="the model's name in Ollama", required=True)
    model: Path | None = setting(None, MODEL_HELP, parse=_hf_model, metavar="DIR")
    system: str | None = setting(None, "SYSTEM prompt")
    num_ctx: int | None = _num_ctx()
    host: str | None = setting(
        None, "Ollama server URL (default: $OLLAMA_HOST, else http://127.0.0.1:11434)", metavar="URL"
    )

    def run(self) -> int:
        ollama.check_name(self.name)
        ollama.create(self.build_modelfile(), self.name, host=self.host)
        return 0


@dataclass
class All:
    """Export a run: merge, then a GGUF of each type, each checked for parity, then a Modelfile. Steps whose
    outputs are up to date are skipped."""

    run_dir: Path = setting(
        help="run directory (uses final/, else the newest checkpoint)",
        flag="--run",
        parse=_directory,
        metavar="DIR",
        env="AEGIS_RUN",
        required=True,
    )
    checkpoint: Path | None = setting(None, "a specific checkpoint instead", parse=_directory, metavar="DIR")
    types: list[str] = setting(
        pipeline.DEFAULT_TYPES,
        f"GGUF types, of: {TYPES}",
        flag="--type",
        choices=names.TYPES,
        metavar="TYPE",
        repeat=True,
        commas=True,
    )
    out: Path | None = setting(None, "default: RUN/export", parse=_out_dir, metavar="DIR")
    base: str | None = setting(None, "override the checkpoint's base model")
    dtype: str = setting("float32", "merge precision", choices=merge.DTYPES)
    device: str = setting("auto", "auto (CUDA if present), cpu, cuda, cuda:N")
    name: str | None = setting(None, "model name (default: from the run directory)")
    system: str | None = setting(None, "SYSTEM prompt for the Modelfile")
    force: bool = setting(False, "redo steps whose outputs are up to date")
    no_progress: bool = setting(False, "no progress bar")

    def problems(self) -> list[str]:
        repeated = [f"--type: repeated ({', '.join(self.types)})"] if len(set(self.types)) != len(self.types) else []
        return repeated + _writable(self.out or (self.run_dir / "export" if self.run_dir else None))

    def run(self) -> int:
        summary = pipeline.export_all(
            self.run_dir,
            self.types,
            out=self.out,
            base=self.base,
            dtype=self.dtype,
            name=self.name,
            system=self.system,
            checkpoint=self.checkpoint,
            force=self.force,
            progress=not self.no_progress,
            device=self.device,
        )
        write_json(Path(summary["merged"]).parent / "export.json", summary)
        return 0


COMMANDS = {"merge": Merge, "gguf": Gguf, "parity": Parity, "modelfile": Modelfile, "ollama": Ollama, "all": All}


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        _, command = cli.parse_command(
            COMMANDS,
            sys.argv[1:] if argv is None else argv,
            prog=PROG,
            description="Merge an AEGIS checkpoint, write GGUF, check parity, make an Ollama model.",
        )
        return command.run()

    return cli.main(body)


if __name__ == "__main__":
    sys.exit(main())
