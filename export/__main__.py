"""python -m export {merge,gguf,parity,modelfile,ollama,all} ...  (see README.md, "Export")"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aegis.errors import AegisError

from . import merge, modelfile, names, ollama, parity, pipeline
from .files import unwritable, write_json


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m export",
                                 description="Merge an AEGIS checkpoint, write GGUF, check parity, make an Ollama model.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    types = ", ".join(names.TYPES)

    p = sub.add_parser("merge", help="checkpoint -> stock HF model (LoRA merged, soul folded into lm_head)")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory (final/ or checkpoints/step_N/)")
    p.add_argument("--out", required=True, type=Path, help="output directory (replaced only if the check passes)")
    p.add_argument("--base", help="base model (hub id or directory); default: the one in the checkpoint")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--no-quant-gap", action="store_true", help="skip measuring the 4-bit training base's gap")

    p = sub.add_parser("gguf", help="merged HF model -> GGUF (then parity)")
    p.add_argument("--model", required=True, type=Path, help="merged model directory")
    p.add_argument("--out", required=True, type=Path, help="FILE.gguf")
    p.add_argument("--type", default="f16", help=f"one of: {types} (default f16)")
    p.add_argument("--name", help="general.name (default: the model directory's name)")
    p.add_argument("--skip-parity", action="store_true", help="write without the llama.cpp parity check")
    p.add_argument("--threads", type=int, help="llama.cpp threads for the parity check")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("parity", help="compare a GGUF with the merged HF model (writes parity.json)")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--gguf", required=True, type=Path)
    p.add_argument("--type", help="thresholds to apply (default: from the file name, else f16)")
    p.add_argument("--threads", type=int)

    model_help = "merged model directory whose chat template the Modelfile follows (default: merged/ beside the GGUF)"
    p = sub.add_parser("modelfile", help="write an Ollama Modelfile for a GGUF (template proved against the model's)")
    p.add_argument("--gguf", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True, type=Path, help="e.g. modelfiles/NAME.modelfile")
    p.add_argument("--system", help="SYSTEM prompt")
    p.add_argument("--num-ctx", type=int, help="default: the GGUF's original context length")
    p.add_argument("--model", type=Path, help=model_help)

    p = sub.add_parser("ollama", help="create an Ollama model from a GGUF (through the ollama client)")
    p.add_argument("--gguf", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--model", type=Path, help=model_help)
    p.add_argument("--system", help="SYSTEM prompt")
    p.add_argument("--num-ctx", type=int, help="default: the GGUF's original context length")
    p.add_argument("--host", help="Ollama server URL (default: $OLLAMA_HOST, else http://127.0.0.1:11434)")

    p = sub.add_parser("all", help="merge -> GGUF (each --type) -> parity -> Modelfile")
    p.add_argument("--run", required=True, type=Path, help="run directory (uses final/, else the newest checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="a specific checkpoint instead")
    p.add_argument("--type", dest="types", action="append", metavar="TYPE",
                   help=f"repeatable or comma-separated; default f16 and q8_0 (known: {types})")
    p.add_argument("--out", type=Path, help="default: RUN/export")
    p.add_argument("--base", help="override the checkpoint's base model")
    p.add_argument("--dtype", default="float32", help="merge precision: float32 (default), float16, bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--name", help="model name (default: from the run directory)")
    p.add_argument("--system", help="SYSTEM prompt for the Modelfile")
    p.add_argument("--force", action="store_true", help="redo steps whose outputs are up to date")
    p.add_argument("--no-progress", action="store_true")
    return ap


def _problems(args) -> list[str]:
    """Every problem with the arguments at once, each naming the option and the file."""
    out = []
    cmd = args.command
    if cmd in ("merge", "all") and args.dtype not in merge.DTYPES:
        out.append(f"--dtype {args.dtype!r}: not one of {', '.join(merge.DTYPES)}")
    if cmd == "merge":
        if not args.checkpoint.is_dir():
            out.append(f"--checkpoint {args.checkpoint}: no such directory")
        if args.out.exists() and not args.out.is_dir():
            out.append(f"--out {args.out}: exists and is not a directory")
    if cmd in ("gguf", "parity"):
        if not (args.model / "config.json").is_file():
            out.append(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    if cmd == "gguf":
        if args.out.suffix != ".gguf":
            out.append(f"--out {args.out}: should end in .gguf")
        if (p := pipeline.check_type(args.type)):
            out.append(p)
    if cmd == "parity":
        if not args.gguf.is_file():
            out.append(f"--gguf {args.gguf}: no such file")
        if args.type and (p := pipeline.check_type(args.type)):
            out.append(p)
    if cmd in ("modelfile", "ollama"):
        if not args.gguf.is_file():
            out.append(f"--gguf {args.gguf}: no such file")
        if args.num_ctx is not None and args.num_ctx <= 0:
            out.append(f"--num-ctx {args.num_ctx}: must be positive")
        if args.model is not None and not (args.model / "config.json").is_file():
            out.append(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    if cmd == "all":
        specs = args.types or pipeline.DEFAULT_TYPES
        args.types = [t.strip() for spec in specs for t in spec.split(",") if t.strip()]
        out += [p for t in args.types if (p := pipeline.check_type(t))]
        if len(set(args.types)) != len(args.types):
            out.append(f"--type: repeated ({', '.join(args.types)})")
        if not args.run.is_dir():
            out.append(f"--run {args.run}: no such directory")
        if args.checkpoint is not None and not args.checkpoint.is_dir():
            out.append(f"--checkpoint {args.checkpoint}: no such directory")
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            out.append(f"--out {args.out}: exists and is not a directory")
    dest = getattr(args, "out", None) or (args.run / "export" if cmd == "all" and args.run.is_dir() else None)
    if dest is not None and (why := unwritable(dest)):
        out.append(f"--out {dest}: cannot write there: {why}")
    return out


def _guess_type(path: Path) -> str:
    stem = path.name.lower().removesuffix(".gguf")
    for t in sorted(names.TYPES, key=len, reverse=True):
        if stem.endswith(t):
            return t
    return "f16"


def run(args) -> int:
    cmd = args.command
    if cmd == "merge":
        merge.merge(args.checkpoint, args.out, base=args.base, dtype=args.dtype, device=args.device,
                    quant_gap=not args.no_quant_gap)
    elif cmd == "gguf":
        pipeline.export_gguf(args.model, args.out, args.type, name=args.name, progress=not args.no_progress,
                             check_parity=not args.skip_parity, threads=args.threads)
    elif cmd == "parity":
        report = parity.check(args.model, args.gguf, args.type or _guess_type(args.gguf), threads=args.threads)
        print(parity.table(report))
        path = parity.record(args.gguf.parent, report)
        print(f"written to {path}")
        return 0 if report["passed"] else 1
    elif cmd == "modelfile":
        modelfile.write(args.gguf, args.out, model_dir=args.model, name=args.name, system=args.system,
                        num_ctx=args.num_ctx)
    elif cmd == "ollama":
        ollama.check_name(args.name)
        mf = modelfile.build(args.gguf, modelfile.model_dir_for(args.gguf, args.model), system=args.system,
                             num_ctx=args.num_ctx, name=args.name)
        ollama.create(mf, args.name, host=args.host)
    elif cmd == "all":
        summary = pipeline.export_all(args.run, args.types, out=args.out, base=args.base, dtype=args.dtype,
                                      name=args.name, system=args.system, checkpoint=args.checkpoint,
                                      force=args.force, progress=not args.no_progress, device=args.device)
        write_json(Path(summary["merged"]).parent / "export.json", summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problems = _problems(args)
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    try:
        return run(args)
    except AegisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
