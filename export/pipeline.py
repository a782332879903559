"""The steps put together: one GGUF (write → quantize → parity), and `all` (merge → GGUFs → Modelfile).

A GGUF is written under a temporary name and only takes its real name when parity passes; one that fails is kept
as NAME.gguf.rejected for inspection and whatever NAME.gguf held before is left alone. Re-running is safe: a
merged model or a GGUF that already came from the same input (recorded fingerprints) is reused, not redone."""

from __future__ import annotations

import re
from pathlib import Path

from aegis import gguf_context
from aegis.atomic import publish, remove, temp_sibling
from aegis.digest import DigestError, verify, write_sidecar

from . import hparams, modelfile as modelfile_mod, names, parity, quantize, to_gguf
from .files import ExportError, find_checkpoint
from .merge import merge, read_report, source_fingerprint, validate_checkpoint

DEFAULT_TYPES = ("f16", "q8_0")
# The float type an intermediate GGUF for llama.cpp's quantizer is written in: the merged model's own precision.
INTERMEDIATE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def check_type(t: str) -> str | None:
    if t not in names.TYPES:
        return f"--type {t!r}: unknown (known: {', '.join(names.TYPES)})"
    return None


def _merged_dtype(model_dir: Path) -> str:
    cfg = hparams.read_config(model_dir)
    return cfg.get("dtype") or cfg.get("torch_dtype") or "float32"


def _merged_fingerprint(model_dir: Path) -> str | None:
    rep = read_report(model_dir)
    return rep.get("source_fingerprint") if rep else None


def export_gguf(
    model_dir: Path,
    out: Path,
    out_type: str,
    name: str | None = None,
    progress: bool = True,
    check_parity: bool = True,
    threads: int | None = None,
    log=print,
) -> dict:
    """Write one GGUF of `out_type` from the merged model at `model_dir`; returns its summary (parity included).
    Raises ExportError when parity fails (after recording it in parity.json)."""
    problem = check_type(out_type)
    if problem:
        raise ExportError(problem)
    model_dir, out = Path(model_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    candidate = temp_sibling(out, ".unchecked")
    try:
        summary = _write_candidate(model_dir, candidate, out, out_type, name, progress, log)
        if not check_parity:
            write_sidecar(out, publish(candidate, out, digest=True))  # what serve checks the file against
            log(f"written without a parity check: {out}")
            summary["parity"] = None
            return {"path": str(out), **summary}
        return _publish_if_parity(model_dir, candidate, out, out_type, summary, threads, log)
    finally:
        remove(candidate)


def _write_candidate(model_dir: Path, candidate: Path, out: Path, out_type: str, name, progress, log) -> dict:
    """Write the GGUF at `candidate`: gguf-py writes the float and Python-quantized types itself; for the others
    llama.cpp's quantizer reads an intermediate GGUF in the merged model's precision. Returns its summary."""
    python = out_type in names.PYTHON_TYPES
    if python:
        result = to_gguf.write_gguf(
            model_dir, candidate, out_type, name=name, progress=progress, log=log, label=f"{out.name} (unchecked)"
        )
        summary = {"fallbacks": result.fallbacks, "notes": result.notes}
    else:
        base_type = INTERMEDIATE.get(_merged_dtype(model_dir), "f32")
        intermediate = temp_sibling(out, f".{base_type}")
        try:
            result = to_gguf.write_gguf(
                model_dir,
                intermediate,
                base_type,
                name=name,
                progress=progress,
                log=log,
                label=f"{base_type} intermediate for {out.name}",
            )
            log(f"quantizing to {out_type} with llama.cpp")
            fallbacks = quantize.llama_quantize(intermediate, candidate, out_type)
        finally:
            remove(intermediate)
        for f in fallbacks:
            log(f"  llama.cpp: {f}")
        summary = {"fallbacks": fallbacks, "notes": result.notes, "intermediate": base_type}
    summary.update(
        type=out_type,
        made_by="gguf-py" if python else "llama.cpp quantizer",
        tensor_types=to_gguf.tensor_types(candidate),
        bytes=candidate.stat().st_size,
        source=_merged_fingerprint(model_dir),
    )
    log(f"tensor types: {', '.join(f'{v} {k}' for k, v in sorted(summary['tensor_types'].items()))}")
    return summary


def _publish_if_parity(model_dir: Path, candidate: Path, out: Path, out_type: str, summary: dict, threads, log):
    """Measure `candidate` against the merged model and record it in parity.json: passed, it takes the name `out`;
    failed, it is kept as `out`.rejected and an ExportError says why."""
    report = parity.check(model_dir, candidate, out_type, threads=threads, log=log, name=str(out))
    report["gguf"] = out.name
    report.update({k: summary[k] for k in ("made_by", "tensor_types", "fallbacks", "notes", "bytes", "source")})
    log(parity.table(report))
    for kind, text in (report["sample"] or {}).items():
        log(f"sample (greedy, {kind} prompt): {text!r}")
    rejected = out.with_name(out.name + ".rejected")
    if report["passed"]:
        write_sidecar(out, publish(candidate, out, digest=True))
        rejected.unlink(missing_ok=True)  # an older failure is now stale
        parity.record(out.parent, report)
        log(f"parity passed: {out}")
        return {"path": str(out), **summary, "parity": report}
    publish(candidate, rejected)
    report["rejected_file"] = rejected.name
    parity.record(out.parent, report)
    raise ExportError(
        f"{out.name}: parity failed ({'; '.join(report['failures'])}); kept as {rejected}, "
        f"{out} was not replaced; details in {out.parent / parity.PARITY_FILE}"
    )


def _up_to_date(gguf_path: Path, source: str | None) -> bool:
    if source is None or not gguf_path.is_file():
        return False
    import json

    try:
        entry = json.loads((gguf_path.parent / parity.PARITY_FILE).read_text()).get(gguf_path.name)
    except (OSError, ValueError):
        return False
    # passed, for this merge, this very file, and its replies were recorded in the context the server now opens it
    # with (records older than the served context have none)
    if not (
        entry
        and entry.get("passed")
        and entry.get("source") == source
        and entry.get("bytes") == gguf_path.stat().st_size
        and entry.get("served_context") == gguf_context.context(gguf_path).default
    ):
        return False
    try:  # and it is still the file that passed: serve refuses a GGUF without a matching record
        verify(gguf_path)
    except (DigestError, OSError):
        return False
    return True


def model_name(run_dir: Path) -> str:
    """An Ollama-friendly name from the run directory's name."""
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(run_dir).resolve().name.lower()).strip("-._")
    return name or "aegis"


def export_all(
    run: Path,
    types: list[str],
    out: Path | None = None,
    base: str | None = None,
    dtype: str = "float32",
    name: str | None = None,
    system: str | None = None,
    checkpoint: Path | None = None,
    force: bool = False,
    progress: bool = True,
    device: str = "auto",
    log=print,
) -> dict:
    run = Path(run)
    ckpt = Path(checkpoint) if checkpoint else find_checkpoint(run, log=log)
    out = Path(out) if out else run / "export"
    name = name or model_name(run)
    meta, _ = validate_checkpoint(ckpt, base)
    merged_dir = out / "merged"
    want = source_fingerprint(ckpt, base or meta["base"], dtype)
    if not force and _merged_fingerprint(merged_dir) == want:
        log(f"merge: {merged_dir} already holds {ckpt} ({dtype}); reusing it")
        merge_report = read_report(merged_dir)
    else:
        merge_report = merge(ckpt, merged_dir, base=base, dtype=dtype, device=device, log=log).to_json()
    ggufs = {}
    for t in types:
        path = out / f"{name}-{t}.gguf"
        if not force and _up_to_date(path, want):
            log(f"gguf: {path} already passed parity for this merge; reusing it")
            ggufs[t] = str(path)
            continue
        ggufs[t] = export_gguf(merged_dir, path, t, name=name, progress=progress, log=log)["path"]
    chosen = min(ggufs.values(), key=lambda p: Path(p).stat().st_size)
    mf = out / f"{name}.modelfile"
    # The Modelfile's template is derived from the merged model's chat template and proved token for token.
    built = modelfile_mod.build(Path(chosen), merged_dir, system=system, name=name, log=log)
    modelfile_mod.write(built, mf, log=log)
    summary = {
        "checkpoint": str(ckpt),
        "merged": str(merged_dir),
        "gguf": ggufs,
        "modelfile": str(mf),
        "parity": str(out / parity.PARITY_FILE),
        "merge_check": merge_report.get("check"),
        "template": built.proof.to_json(),
    }
    log("")
    log(f"checkpoint  {ckpt}")
    log(f"merged      {merged_dir}")
    for t, p in ggufs.items():
        log(f"gguf {t:<6} {p}")
    log(f"parity      {out / parity.PARITY_FILE}")
    log(f"template    {built.proof.summary()}")
    log(
        f"modelfile   {mf}  (FROM {Path(chosen).name}; `ollama create {name} -f {mf}`, or without the CLI "
        f"`python -m export ollama --gguf {chosen} --name {name}`)"
    )
    return summary
