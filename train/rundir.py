"""A run directory's rules, checked before any model is loaded: one run per directory, a place that can be written,
and the checkpoint a resume starts from (the newest that verifies, trained with a config this one can continue)."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from aegis import checkpoint
from aegis.atomic import temp_sibling
from aegis.config import Config, to_dict
from aegis.errors import AegisError
from aegis.metrics import METRICS
from aegis.runs import CONFIG, SUMMARY

# What a run (and `python -m export all --run` by default) writes into its directory; `--overwrite` removes these.
RUN_ENTRIES = (checkpoint.FINAL, checkpoint.CHECKPOINTS, METRICS, SUMMARY, CONFIG, "profile.txt", "export")
LOCK = "train.lock"  # held by the trainer using the directory (`lock`)
_held: dict[Path, int] = {}
# Keys that change the shape or number of a checkpoint's tensors: a resume must keep them.
SHAPE_KEYS = ("model.base", "lora.r", "lora.target_modules", "soul.alpha_mode")


class RunError(AegisError):
    """A run that cannot start or go on; the message names the directory, file, key or step."""


def started(run_dir: Path) -> list[str]:
    """What in `run_dir` shows that a run was started there (metrics, checkpoints, final/)."""
    return [name for name in (METRICS, checkpoint.CHECKPOINTS, checkpoint.FINAL) if (Path(run_dir) / name).exists()]


def prepare(run_dir: Path, resume: bool, overwrite: bool, main: bool = True, log=print) -> None:
    """One run per directory: refuse one that holds a run unless resuming, or clear it for `overwrite`; then make
    sure the directory can be written (the main process creates it)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunError("--resume continues the run and --overwrite deletes it: choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: exists and is not a directory (--run-dir names the directory for the run)")
    found = started(run_dir) if run_dir.is_dir() else []
    if found and not (resume or overwrite):
        raise RunError(
            f"{run_dir}: already holds a run ({', '.join(found)}); continue it with --resume, or start "
            f"clean with --overwrite (which deletes it)"
        )
    if not main:
        return
    _writable(run_dir)
    lock(run_dir)  # before --overwrite deletes anything: the run there may be a live one
    if overwrite and found:
        for name in RUN_ENTRIES:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        log(f"{run_dir}: --overwrite removed the earlier run")


def _writable(run_dir: Path) -> None:
    probe = temp_sibling(run_dir / "probe")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"{run_dir}: cannot be written ({e.strerror or e})") from None


def lock(run_dir: Path) -> None:
    """Hold the run directory for this process's lifetime: a second trainer there (a --resume while the run still
    trains would read checkpoints the live run prunes) fails at once, naming the first one's PID. An flock on an
    open file: the kernel drops it when the process ends, however it ends (kill -9 too), so none is ever stale.
    The file stays; removing it would let two processes lock two different files of the same name."""
    path = Path(run_dir) / LOCK
    if path.parent.resolve() in _held:
        return  # this process holds it already
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunError(
            f"{run_dir}: in use by another trainer (PID {holder}, holding {path}); wait for it to "
            f"finish or stop it, then run again"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path.parent.resolve()] = fd  # kept open, and so locked, until `unlock` or the process's end


def unlock(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def resume_point(run_dir: Path, cfg: Config, world: int, log=print) -> tuple[Path | None, dict]:
    """The checkpoint to resume from (None: step 0 on a run killed before its first checkpoint) and its trainer
    state, after checking that this config and process count can continue it."""
    start = checkpoint.newest_verified(run_dir, resumable=True, log=log)
    if start is None:
        if checkpoint.candidates(run_dir):
            raise RunError(f"{run_dir}: no checkpoint verifies (each is named above); start clean with --overwrite")
        log(f"{run_dir}: no checkpoint to resume from; starting from step 0")
        return None, {}
    try:
        state = checkpoint.read_state(start)
    except checkpoint.CheckpointError as e:
        raise RunError(str(e)) from None
    changed = shape_changes(state.get("config", {}), cfg)
    if changed:
        raise RunError(
            f"{start}: cannot resume: keys that set the shapes of its tensors differ from the "
            f"checkpoint's: {', '.join(changed)}; set them back, or start clean with --overwrite"
        )
    accum_for(cfg, state, world)  # a global batch that cannot be kept is an error now, not after loading
    return start, state


def shape_changes(saved: dict, cfg: Config) -> list[str]:
    """'key: checkpoint X, now Y' for each shape-changing key whose value differs from the checkpoint's config."""
    now = to_dict(cfg)
    out = []
    for key in SHAPE_KEYS:
        section, name = key.split(".")
        if name in saved.get(section, {}) and saved[section][name] != now[section][name]:
            out.append(f"{key} ({saved[section][name]!r} there, {now[section][name]!r} now)")
    return out


def accum_for(cfg: Config, state: dict, world: int) -> int:
    """Gradient accumulation that keeps the checkpoint's global batch (processes x micro-batch x accumulation)."""
    glob = state.get("global_batch", world * cfg.train.batch_size * cfg.train.grad_accum)
    if world * cfg.train.batch_size * cfg.train.grad_accum == glob:
        return cfg.train.grad_accum
    accum, rem = divmod(glob, world * cfg.train.batch_size)
    if rem or accum < 1:
        raise RunError(
            f"resume: the checkpoint's global batch of {glob} sequences cannot be kept with {world} "
            f"process(es) x train.batch_size {cfg.train.batch_size}; choose a batch size that divides it"
        )
    return accum
