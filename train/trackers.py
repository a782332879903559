"""Experiment trackers (`train.report_to`): TensorBoard, W&B, MLflow and trackio, each a sink of the metrics logger
(aegis/metrics.py) built on accelerate's tracker class for it. metrics.jsonl stays the record every reader uses; a
tracker is an extra view of it, so one that fails mid-run is warned about once and dropped, and training goes on.

Where each one writes: TensorBoard to RUN/tensorboard/; W&B under RUN/wandb/, online or offline as `WANDB_MODE` says,
in the project `WANDB_PROJECT` (default `aegis`); MLflow to `MLFLOW_TRACKING_URI` (default mlflow.db in the working
directory), experiment `MLFLOW_EXPERIMENT_NAME` (default `aegis`); trackio to its local store (`TRACKIO_DIR`; a Space
only if `TRACKIO_SPACE_ID` names one), project `aegis`. RUN/trackers.json keeps each tracker's run, so a resumed run
(and `python -m train.eval` on one of its checkpoints) continues it."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import uuid
from pathlib import Path

from aegis import atomic, runs
from aegis.config import Config, to_dict
from aegis.metrics import MetricLogger

from .rundir import RunError

EXTRA = "trackers"  # pyproject.toml's extra that installs them all
STATE = "trackers.json"
PROJECT = "aegis"
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
HINTS = {"wandb": " (WANDB_MODE=offline logs without an account or a network)"}


class TrackerError(RunError):
    """A tracker that is not installed or cannot start; the message names train.report_to."""


def check(names: list[str]) -> None:
    """Every tracker named is installed: checked before any model loads."""
    for name in names:
        if importlib.util.find_spec(MODULES[name]) is None:
            raise TrackerError(f"train.report_to: {name} is not installed (pip install 'aegis-soul[{EXTRA}]')")


def hparams(cfg: Config) -> dict:
    """The config as `section.key` -> a number, a bool or a string (a list joined by commas): what every tracker
    takes as a run's parameters."""
    out = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            out[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


class TrackerSink:
    """One tracker as a metrics sink: each record's numbers at its step. Steps up to `skip_to` were logged by the
    session a resume replaces, so they are not logged twice."""

    def __init__(self, name: str, tracker, skip_to: int = 0, warn=print):
        self.name, self.tracker, self.skip_to, self.warn = name, tracker, skip_to, warn
        self.failed = False

    def __call__(self, record: dict) -> None:
        step = record["step"]
        if self.failed or step <= self.skip_to:
            return
        values = {
            k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self._guard(f"step {step}", lambda: self.tracker.log(values, step=step))

    def close(self) -> None:
        self._guard("the end", self.tracker.finish)

    def _guard(self, when: str, call) -> None:
        if self.failed:
            return
        try:
            call()
        except Exception as e:  # any failure of the tracker's library or store: it is a view, training goes on
            self.failed = True
            self.warn(
                f"warning: train.report_to: {self.name} failed at {when} ({_first_line(e)}); training goes on "
                f"without it"
            )


def start(cfg: Config, run_dir: Path, logged: int = 0, warn=print) -> list[TrackerSink]:
    """A started sink for each tracker of `cfg.train.report_to`, the config stored with each. A tracker whose run
    RUN/trackers.json names is continued, skipping the steps up to `logged` (what metrics.jsonl held before a
    resume cut it back: the killed session gave those to the trackers); any other starts a new run."""
    names = list(dict.fromkeys(cfg.train.report_to))
    if not names:
        return []
    check(names)
    run_dir = Path(run_dir)
    state = _state(run_dir)
    config = hparams(cfg)
    sinks = []
    for name in names:
        known = state.get(name)
        try:
            tracker = _OPEN[name](run_dir, known)
            tracker.start()
            tracker.store_init_configuration(config)
        except Exception as e:  # a library's own error (no W&B login, a store it cannot open): one line, by name
            hint = HINTS.get(name, "")
            raise TrackerError(f"train.report_to: {name} could not start: {_first_line(e)}{hint}") from e
        state[name] = _identity(name, tracker)
        sinks.append(TrackerSink(name, tracker, logged if known is not None else 0, warn))
    atomic.write_json(run_dir / STATE, state)
    return sinks


def log_eval(ckpt: Path, result: dict, warn=print) -> None:
    """The figures of `python -m train.eval` (`eval/VARIANT/loss`, `.../perplexity`, ...) into the tracker runs of
    the run that holds `ckpt`, at the checkpoint's step; nothing for a checkpoint of a run without trackers."""
    run_dir = runs.run_of(ckpt)
    if run_dir is None or not (run_dir / STATE).is_file():
        return
    record = {"step": result.get("step") or 0}
    for variant, figures in result["results"].items():
        record.update({f"eval/{variant}/{key}": value for key, value in figures.items()})
    with contextlib.redirect_stdout(sys.stderr):  # the trackers' chatter stays off the command's output (--json)
        logger = MetricLogger(reopen(run_dir, warn))
        logger.log(record)
        logger.close()


def reopen(run_dir: Path, warn=print) -> list[TrackerSink]:
    """Sinks continuing the runs RUN/trackers.json names of the trackers the run's config names, for records a
    later command adds (evaluation figures); a tracker that cannot be reopened is warned about and left out. Each
    gets the run's config again: trackio keeps a run's config with its newest session."""
    cfg = runs.read_config(run_dir)
    state = _state(Path(run_dir))
    sinks = []
    for name in cfg.train.report_to if cfg is not None else []:
        known = state.get(name)
        if known is None:  # named, but its run never started
            continue
        if importlib.util.find_spec(MODULES[name]) is None:
            warn(f"warning: train.report_to: {name} is not installed (pip install 'aegis-soul[{EXTRA}]')")
            continue
        try:
            tracker = _OPEN[name](Path(run_dir), known)
            tracker.start()
            tracker.store_init_configuration(hparams(cfg))
        except Exception as e:
            warn(f"warning: train.report_to: {name} could not be reopened ({_first_line(e)})")
            continue
        sinks.append(TrackerSink(name, tracker, 0, warn))
    return sinks


def _state(run_dir: Path) -> dict:
    path = run_dir / STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# ---- one opener per tracker: accelerate's class, where it writes, and how it continues a run ------------------------


def _tensorboard(run_dir: Path, known: dict | None):
    from accelerate.tracking import TensorBoardTracker

    return TensorBoardTracker("tensorboard", run_dir)  # RUN/tensorboard: a resumed run adds an event file there


def _wandb(run_dir: Path, known: dict | None):
    from accelerate.tracking import WandBTracker

    more = {"id": known["id"], "resume": "allow"} if known else {"id": uuid.uuid4().hex[:12]}
    return WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name, dir=str(run_dir), **more)


def _mlflow(run_dir: Path, known: dict | None):
    import mlflow
    from accelerate.tracking import MLflowTracker

    if known:  # the store the run was started in, wherever this command runs from
        mlflow.set_tracking_uri(known["tracking_uri"])
    return MLflowTracker(PROJECT, run_id=known["run_id"] if known else None, run_name=run_dir.name)


def _trackio(run_dir: Path, known: dict | None):
    from accelerate.tracking import TrackioTracker

    # trackio continues a run by its name: each run directory's gets a suffix of its own
    name, resume = (known["name"], "must") if known else (f"{run_dir.name}-{uuid.uuid4().hex[:8]}", "never")
    return TrackioTracker(PROJECT, name=name, resume=resume, embed=False, auto_log_cpu=False, auto_log_gpu=False)


_OPEN = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow, "trackio": _trackio}


def _identity(name: str, tracker) -> dict:
    """What RUN/trackers.json keeps of a started tracker to continue its run."""
    if name == "wandb":
        return {"id": tracker.run.id}
    if name == "mlflow":
        import mlflow

        return {"run_id": tracker.active_run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}
    if name == "trackio":
        return {"name": tracker.run.name}
    return {"dir": str(tracker.logging_dir)}
