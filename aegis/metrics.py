"""One metrics interface: the training loop calls `log(record)`; sinks write it (metrics.jsonl, the progress bar, the
experiment trackers of train.report_to in train/trackers.py). The monitor, the UI and the reports all read
metrics.jsonl through `read()`: a tracker is an extra view, never a source."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .atomic import write_text

METRICS = "metrics.jsonl"


def read(path: Path) -> list[dict]:
    """Every complete record of a metrics file; a truncated last line (a writer mid-append) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def number(value) -> float:
    """A metric value as a float: non-finite floats come back from the strings 'nan', 'inf', '-inf' they were
    written as; anything else that is not a number (missing, a bool, text) is NaN."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; number() reads these strings back
    return value


class JsonlSink:
    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records written after the checkpoint we resume from (atomically)."""
        keep = [r for r in read(self.path) if r["step"] <= step]
        write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))

    def __call__(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}, ensure_ascii=False) + "\n")
            f.flush()


class ProgressSink:
    """A tqdm bar with step, loss, alpha, gate, phase and tokens/s (ETA comes with tqdm)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)

    def __call__(self, r: dict) -> None:
        self.bar.set_postfix_str(
            f"loss {r['loss']:.3f} α {r['alpha']:+.3f} gate {r['gate']:.4f} {r['phase']} {r['tokens_per_s']:.0f} tok/s",
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class MetricLogger:
    """Hands each record to every sink, in order; `close()` closes each sink once (a sink may have an optional
    `close`), whether the run finished or stopped."""

    def __init__(self, sinks):
        self.sinks = list(sinks)

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink(record)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            getattr(sink, "close", lambda: None)()
