"""Checkpoint I/O in one place. No pickle is ever written or read: tensors go to safetensors, the rest to JSON.

A checkpoint directory (`checkpoints/step_N/` or `final/`) holds:
    adapter_config.json, adapter_model.safetensors   the LoRA adapter, as PEFT writes it (PeftModel loads it)
    soul.safetensors                                  generators (B, 28) and alpha; metadata: step, gate, mix, ...
    tokenizer files                                   as the base's tokenizer saves them
    optimizer.safetensors, trainer_state.json         what resume needs: optimizer, LR scheduler, RNG, data position
    rng.safetensors
    manifest.json                                     size and sha256 of every other file, written last
It is written whole (aegis/atomic.py: a temporary name, renamed when complete), so a run killed at any moment never
leaves a directory that resume or export would take for complete. Every reader verifies the manifest first
(`verify`), so a file changed on disk afterwards (flipped bytes, a truncated copy) is caught before anything trusts
it. A checkpoint without a manifest cannot be verified and is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from . import train_state
from .atomic import TMP_PREFIX, atomic_dir, discard, remove, size_of
from .errors import CheckpointError
from .manifest import FORMAT_VERSION, verify, write_manifest

# torch (and safetensors' torch side) is imported by the functions that move tensors, not here: export's commands
# and the torch-less serve image look at run directories through this module and start without it.
if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SOUL = "soul.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
STATE = "trainer_state.json"
REQUIRED = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SOUL)
RESUMABLE = REQUIRED + (OPTIMIZER, RNG, STATE)
CHECKPOINTS = "checkpoints"
FINAL = "final"


# ---- the soul ---------------------------------------------------------------------------------------------------


def save_soul(path: Path, soul, meta: dict) -> None:
    from safetensors.torch import save_file

    metadata = {k: json.dumps(v) for k, v in meta.items()}
    metadata.update(
        format_version=str(FORMAT_VERSION),
        hidden_size=str(soul.hidden_size),
        mix=json.dumps(soul.mix),
        gate=json.dumps(float(soul.gate())),
    )
    save_file(
        {
            "generators": soul.generators.detach().float().cpu().contiguous(),
            "alpha": soul.alpha.detach().float().cpu().reshape(1),
        },
        str(path),
        metadata=metadata,
    )


def read_soul(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The soul's tensors and metadata (values JSON-decoded), checked for format and shape."""
    path = Path(ckpt) / SOUL
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no {SOUL} (not an AEGIS checkpoint, or an incomplete one)")
    with safe_open(str(path), "pt") as f:
        raw = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = {k: json.loads(v) for k, v in raw.items()}
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: soul format version {meta.get('format_version')!r}; this AEGIS reads version {FORMAT_VERSION}"
        )
    hidden = meta.get("hidden_size")
    if "generators" not in tensors or "alpha" not in tensors or not isinstance(hidden, int):
        raise CheckpointError(f"{path}: missing generators, alpha or hidden_size")
    if tuple(tensors["generators"].shape) != (hidden // 8, 28):
        raise CheckpointError(
            f"{path}: generators have shape {tuple(tensors['generators'].shape)}, expected "
            f"({hidden // 8}, 28) for hidden size {hidden}"
        )
    return tensors, meta


def load_soul_into(soul, ckpt: Path) -> dict:
    import torch

    tensors, meta = read_soul(ckpt)
    if meta["hidden_size"] != soul.hidden_size:
        raise CheckpointError(
            f"{Path(ckpt) / SOUL}: soul hidden size {meta['hidden_size']} does not match the "
            f"base model's {soul.hidden_size}"
        )
    with torch.no_grad():
        soul.generators.copy_(tensors["generators"].to(soul.generators))
        soul.alpha.copy_(tensors["alpha"].reshape(()).to(soul.alpha))
    soul.mix = meta.get("mix", soul.mix)
    return meta


# ---- whole checkpoints ------------------------------------------------------------------------------------------


def save(
    dest: Path,
    *,
    model,
    soul,
    tokenizer,
    optimizer=None,
    scheduler=None,
    soul_meta: dict,
    trainer_state: dict | None = None,
    before_commit=None,
) -> Path:
    """Write a complete checkpoint at `dest` atomically (aegis/atomic.py). `before_commit(tmp)` is a test hook. A
    write that fails leaves nothing behind (an older `dest` stays); one that ran out of room is a NoSpaceError
    naming `dest` and about what it needs (the size of the run's newest checkpoint)."""
    dest = Path(dest)

    def needed(written: int) -> int:
        run = dest.parent if dest.name == FINAL else dest.parent.parent
        like = latest(run, resumable=optimizer is not None)  # the same tensors, so about the same size
        return max(size_of(like), written) if like is not None else None

    with atomic_dir(dest, needed, then="continue with --resume") as tmp:
        _write(tmp, model, soul, tokenizer, optimizer, scheduler, soul_meta, trainer_state)
        if before_commit is not None:
            before_commit(tmp)
    return dest


def _write(tmp: Path, model, soul, tokenizer, optimizer, scheduler, soul_meta: dict, trainer_state: dict | None):
    from safetensors.torch import save_file

    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_soul(tmp / SOUL, soul, soul_meta)
    if optimizer is not None:
        state = dict(trainer_state or {})
        state["optimizer"] = train_state.save_optimizer(tmp / OPTIMIZER, optimizer)
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        rng_tensors, state["rng"] = train_state.rng_state()
        save_file(rng_tensors, str(tmp / RNG))
        state["format_version"] = FORMAT_VERSION
        (tmp / STATE).write_text(json.dumps(state, indent=1))
    write_manifest(tmp)


def is_complete(path: Path, resumable: bool = False) -> bool:
    path = Path(path)
    return (
        path.is_dir()
        and not path.name.startswith(TMP_PREFIX)
        and all((path / f).is_file() for f in (RESUMABLE if resumable else REQUIRED))
    )


def step_of(path: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", Path(path).name)
    return int(m.group(1)) if m else -1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if step_of(p) >= 0 and is_complete(p)), key=step_of)


def latest(run_dir: Path, resumable: bool = True) -> Path | None:
    """The newest complete checkpoint, final/ first, without verifying it (what the monitor shows)."""
    cands = [p for p in list_checkpoints(run_dir) if is_complete(p, resumable)]
    final = Path(run_dir) / FINAL
    if is_complete(final, resumable):
        return final
    return cands[-1] if cands else None


def candidates(run_dir: Path) -> list[Path]:
    """Every checkpoint directory of a run, newest first: final/, then checkpoints/step_N/ (complete or not)."""
    root = Path(run_dir) / CHECKPOINTS
    steps = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0), key=step_of) if root.is_dir() else []
    final = Path(run_dir) / FINAL
    return ([final] if final.is_dir() else []) + steps[::-1]


def newest_verified(run_dir: Path, resumable: bool = True, log=print) -> Path | None:
    """The newest checkpoint that is complete and verifies (what resume and export use). Each newer one that fails
    is reported through `log` and skipped; None when none is left."""
    failed = []
    for ckpt in candidates(run_dir):
        try:
            missing = [f for f in (RESUMABLE if resumable else REQUIRED) if not (ckpt / f).is_file()]
            if missing:
                raise CheckpointError(f"{ckpt}: missing {', '.join(missing)}")
            verify(ckpt)
        except CheckpointError as e:
            log(f"skipping checkpoint {ckpt}: {e}")
            failed.append(ckpt)
            continue
        if failed:
            log(f"using {ckpt}, the newest checkpoint that verifies")
        return ckpt
    return None


def read_state(ckpt: Path) -> dict:
    """The trainer state of a resumable checkpoint: step, data position, world size, the run's config, ..."""
    path = Path(ckpt) / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(f"{path}: format version {version!r} is not {FORMAT_VERSION}")
    return state


def resume(ckpt: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG from `ckpt`; returns the trainer state (step, data position, ...)."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    train_state.load_optimizer(ckpt / OPTIMIZER, optimizer, state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    train_state.restore_rng(ckpt / RNG, state["rng"])
    return state


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep only the newest `keep_last` step checkpoints (0 keeps all); stale temporary directories go too."""
    root = Path(run_dir) / CHECKPOINTS
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            discard(old)  # a kill halfway through leaves a temporary name, never a step_N with files missing
    if root.is_dir():
        for tmp in root.glob(f"{TMP_PREFIX}*"):
            remove(tmp)


def adapter_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt) / ADAPTER_WEIGHTS))
