"""Merge a checkpoint into one stock Hugging Face model: base (unquantized) + LoRA merged + the soul folded into the
head. The soul is linear (h' = M h), so head(soul(h)) = (W M) h and the head weight W M replaces W; a base that ties
its head to the token embeddings is untied first, or the fold would rotate the embeddings too.

The result loads in plain `transformers` with no AEGIS code. Before it replaces anything on disk it is reloaded and
its logits are compared with the checkpoint model's (unquantized base + adapter + soul)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aegis import checkpoint, loading, manifest
from aegis.atomic import atomic_dir
from aegis.pretrained import pretrained

from . import prompts
from .files import ExportError, fingerprint

# torch and transformers are imported inside the functions that use them: `python -m export` checks its arguments,
# and runs its steps that need no torch, without loading it.

DTYPES = ("float32", "float16", "bfloat16")
# Bound on max|Δlogit| / max|logit| between merged and checkpoint model: float32 only differs by summation order;
# half precision rounds the merged weights once more than the unmerged adapter path does.
RELATIVE_BOUND = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
REPORT = "aegis_export.json"
# Files the tokenizer may need that save_pretrained does not always write (GGUF export reads scores from the
# SentencePiece model).
EXTRA_FILES = ("tokenizer.model", "chat_template.jinja")


@dataclass
class LogitDiff:
    max_abs: float
    relative: float
    top1_agreement: float
    per_prompt: dict[str, float] = field(default_factory=dict)


@dataclass
class MergeReport:
    checkpoint: str
    step: int | None
    base: str
    base_path: str
    dtype: str
    source_fingerprint: str
    soul_gate: float
    untied_head: bool
    check: LogitDiff
    bound: float
    quantization: str
    quantization_gap: LogitDiff | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExportError(f"--device {name}: no CUDA device here")
    return torch.device(name)


def source_fingerprint(ckpt: Path, base: str, dtype: str) -> str:
    digest = fingerprint([Path(ckpt) / n for n in checkpoint.REQUIRED])
    return f"{digest}-{base}-{dtype}"


def validate_checkpoint(ckpt: Path, base: str | None = None) -> tuple[dict, Path]:
    """Check the checkpoint before any model is loaded; returns (soul metadata, base directory)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise ExportError(f"{ckpt}: no such checkpoint directory")
    for name in checkpoint.REQUIRED:
        if not (ckpt / name).is_file():
            hint = (
                f" (it looks like a run directory: use {ckpt / checkpoint.FINAL} or `python -m export all "
                f"--run {ckpt}`)"
                if (ckpt / checkpoint.FINAL).is_dir()
                else ""
            )
            raise ExportError(f"{ckpt / name}: missing; {ckpt} is not a complete AEGIS checkpoint{hint}")
    manifest.verify(ckpt)
    _, meta = checkpoint.read_soul(ckpt)
    name = base or meta.get("base")
    if not name:
        raise ExportError(f"{ckpt / checkpoint.SOUL}: metadata has no 'base'; pass --base")
    base_path = loading.resolve_base(name, meta.get("revision", "") if not base else "")
    cfg_file = base_path / "config.json"
    if not cfg_file.is_file():
        raise ExportError(f"{cfg_file}: missing; the base is not a Hugging Face model directory")
    cfg = json.loads(cfg_file.read_text())
    hidden = cfg.get("hidden_size", cfg.get("text_config", {}).get("hidden_size"))
    if hidden != meta["hidden_size"]:
        raise ExportError(
            f"{ckpt / checkpoint.SOUL}: hidden_size {meta['hidden_size']} does not match the base "
            f"{base_path} (config.json hidden_size {hidden})"
        )
    return meta, base_path


def logits_for(model, items: list[tuple[str, list[int]]]) -> dict:
    import torch

    device = next(model.parameters()).device
    out = {}
    with torch.no_grad():
        for label, ids in items:
            x = torch.tensor([ids], device=device)
            out[label] = model(input_ids=x).logits[0].float().cpu()
    return out


def compare(ref: dict, got: dict) -> LogitDiff:

    per, top, n, peak = {}, 0, 0, 0.0
    for label, a in ref.items():
        b = got[label]
        per[label] = float((a - b).abs().max())
        top += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
        peak = max(peak, float(a.abs().max()))
    worst = max(per.values())
    return LogitDiff(max_abs=worst, relative=worst / max(peak, 1e-12), top1_agreement=top / max(n, 1), per_prompt=per)


def fold_head(model, soul, dtype) -> bool:
    """Replace the soul-wrapped head by a plain Linear holding W M; unties a tied head. Returns whether it was tied."""
    import torch
    from torch import nn

    head = model.get_output_embeddings()
    if getattr(head, "soul", None) is not soul:
        raise ExportError("merge: the model's head does not carry this soul (internal error)")
    inner = head.head
    embed = model.get_input_embeddings()
    tied = inner.weight is embed.weight or inner.weight.data_ptr() == embed.weight.data_ptr()
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    tied = tied or bool(getattr(text_cfg, "tie_word_embeddings", False))
    new = nn.Linear(
        inner.in_features, inner.out_features, bias=inner.bias is not None, dtype=dtype, device=inner.weight.device
    )
    with torch.no_grad():
        # A fresh Parameter: the embeddings keep the unrotated W even when the head shared them.
        new.weight = nn.Parameter(soul.fold(inner.weight).to(dtype), requires_grad=False)
        if inner.bias is not None:
            new.bias.copy_(inner.bias)
    model.set_output_embeddings(new)
    for c in {id(cfg): cfg, id(text_cfg): text_cfg}.values():
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    return tied


def _copy_extras(out: Path, ckpt: Path, base_path: Path) -> None:
    for name in EXTRA_FILES:
        if (out / name).exists():
            continue
        for src in (ckpt / name, base_path / name):
            if src.is_file():
                shutil.copy(src, out / name)
                break


def _save(out: Path, merged, tok, ckpt: Path, base_path: Path) -> None:
    """The merged weights, the tokenizer and the files beside them, as a stock HF directory."""
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _copy_extras(out, ckpt, base_path)


def _reload_and_check(tmp: Path, reference, items, dtype: str, dev, out: Path, log):
    """Load what was written with plain transformers, as a user would, and compare its logits with the checkpoint
    model's; an ExportError when they differ by more than the bound of `dtype`. Returns (model, diff, bound)."""
    import torch

    reloaded = pretrained(tmp, dtype=getattr(torch, dtype), device_map={"": dev})
    reloaded.eval()
    diff = compare(reference, logits_for(reloaded, items))
    bound = RELATIVE_BOUND[dtype]
    log(
        f"merge check: max |Δlogit| {diff.max_abs:.3g} (relative {diff.relative:.3g}, bound {bound:g}), "
        f"top-1 agreement {diff.top1_agreement:.1%}"
    )
    if not diff.relative <= bound:
        raise ExportError(
            f"merge check failed: merged logits differ from the checkpoint model's by "
            f"{diff.relative:.3g} (relative) > {bound:g}; {out} was left as it was"
        )
    return reloaded, diff, bound


def merge(
    ckpt: Path,
    out: Path,
    base: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    quant_gap: bool = True,
    log=print,
) -> MergeReport:
    """Merge `ckpt` into a stock HF directory at `out` (replaced only when the logit check passes)."""
    import torch

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: not one of {', '.join(DTYPES)}")
    start = time.time()
    ckpt, out = Path(ckpt), Path(out)
    meta, base_path = validate_checkpoint(ckpt, base)
    dev = resolve_device(device)
    tdtype = getattr(torch, dtype)
    base_name = base or meta["base"]
    log(f"merge: {ckpt} (step {meta.get('step')}) onto {base_path} in {dtype} on {dev}")

    model, soul, tok, meta = loading.load_checkpoint(ckpt, base=base_name, quantization="none", dtype=dtype, device=dev)
    items = prompts.check_set(tok)
    reference = logits_for(model, items)
    merged = model.merge_and_unload()
    untied = fold_head(merged, soul, tdtype)
    merged.config.use_cache = True
    # what the weights take on disk (safetensors adds a header of a few KiB): the room a full disk is short of
    needed = sum(t.numel() * t.element_size() for t in merged.state_dict().values())
    with atomic_dir(out, needed) as tmp:
        _save(tmp, merged, tok, ckpt, base_path)
        del model, merged
        reloaded, diff, bound = _reload_and_check(tmp, reference, items, dtype, dev, out, log)
        quantization = meta.get("quantization", "none")
        gap = None
        if quantization != "none" and quant_gap:
            gap = _quantization_gap(ckpt, base_name, quantization, dtype, dev, items, reloaded, log)
        report = MergeReport(
            checkpoint=str(ckpt),
            step=meta.get("step"),
            base=base_name,
            base_path=str(base_path),
            dtype=dtype,
            source_fingerprint=source_fingerprint(ckpt, base_name, dtype),
            soul_gate=float(soul.gate()),
            untied_head=untied,
            check=diff,
            bound=bound,
            quantization=quantization,
            quantization_gap=gap,
            seconds=round(time.time() - start, 1),
        )
        (tmp / REPORT).write_text(json.dumps(report.to_json(), indent=1))
        del reloaded
    log(f"merged model written to {out}")
    return report


def _quantization_gap(ckpt, base_name, quantization, dtype, dev, items, merged, log) -> LogitDiff | None:
    """How far the model as trained (4-bit base + adapter + soul) is from the full-precision merge: the
    quantization gap, reported, never an error."""
    try:
        trained, *_ = loading.load_checkpoint(ckpt, base=base_name, quantization=quantization, dtype=dtype, device=dev)
    except Exception as e:  # bitsandbytes may not run here; the merge itself does not need it
        log(f"quantization gap: not measured ({quantization} base could not be loaded: {e})")
        return None
    gap = compare(logits_for(trained, items), logits_for(merged, items))
    del trained
    log(
        f"quantization gap ({quantization} base as trained vs full-precision merge): max |Δlogit| "
        f"{gap.max_abs:.3g} (relative {gap.relative:.3g}), top-1 agreement {gap.top1_agreement:.1%}"
    )
    return gap


def read_report(model_dir: Path) -> dict | None:
    path = Path(model_dir) / REPORT
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
