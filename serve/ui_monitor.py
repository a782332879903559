"""The Soul monitor's data and pictures: runs found under a directory, their metrics read through aegis.metrics, and
one figure of loss, α (with the φ line), gate, orthogonality error and tokens/s, drawn with matplotlib on the
server (no plotting scripts from anywhere else reach the browser)."""

from __future__ import annotations

import html
import io
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

if TYPE_CHECKING:
    from PIL import Image

matplotlib.use("Agg")  # no display here; figures are rendered to images

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from aegis import metrics as train_metrics, runs  # noqa: E402
from aegis.config import ConfigError  # noqa: E402
from aegis.metrics import number  # noqa: E402
from aegis.schedule import PHI, gate as gate_of  # noqa: E402

from .ui_theme import NEON  # noqa: E402

LIVE_WINDOW_S = 60  # a run whose metrics changed this recently is shown as live


def list_runs(root: Path) -> list[Path]:
    """Run directories (holding metrics.jsonl) at root, one and two levels below it; newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {
        p.parent
        for pattern in (train_metrics.METRICS, f"*/{train_metrics.METRICS}", f"*/*/{train_metrics.METRICS}")
        for p in root.glob(pattern)
    }
    return sorted(found, key=lambda p: (p / train_metrics.METRICS).stat().st_mtime, reverse=True)


def target_alpha(run: Path) -> float:
    """The schedule's target α from the run's config.toml (φ unless the run chose otherwise)."""
    try:
        cfg = runs.read_config(run)
    except ConfigError:  # one run's unreadable config does not take the monitor of every run down
        return PHI
    return cfg.schedule.target_alpha if cfg else PHI


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], number(r[key])) for r in records if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def status(run: Path, records: list[dict]) -> dict:
    path = Path(run) / train_metrics.METRICS
    age = time.time() - path.stat().st_mtime if path.exists() else math.inf
    last = records[-1] if records else {}
    finished = (Path(run) / runs.SUMMARY).exists()
    return {
        "step": last.get("step"),
        "phase": last.get("phase", "—"),
        "loss": number(last.get("loss")),
        "alpha": number(last.get("alpha")),
        "gate": number(last.get("gate")),
        "ortho_error": number(last.get("ortho_error")),
        "tokens_per_s": number(last.get("tokens_per_s")),
        "live": age < LIVE_WINDOW_S and not finished,
        "finished": finished,
        "age_s": age,
    }


def badge_html(info: dict, run: Path | None) -> str:
    phase = str(info.get("phase", "—"))
    state = "LIVE" if info.get("live") else "FINISHED" if info.get("finished") else "IDLE"
    name = html.escape(Path(run).name) if run else "no run"

    def fmt(key, spec):
        value = info.get(key)
        return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    # classes, not inline styles, colour the badge (ui_theme's CSS): the page's markdown keeps no style attributes
    return (
        f'<div class="soul-status"><span class="phase-badge phase-{html.escape(phase)}" '
        f'data-phase="{html.escape(phase)}">{html.escape(phase.upper())}</span>'
        f'<span class="run-state">{state}</span> <b>{name}</b> · step {info.get("step") or "—"} · '
        f"loss {fmt('loss', '.3f')} · α {fmt('alpha', '+.4f')} · gate {fmt('gate', '.4f')} · "
        f"ortho {fmt('ortho_error', '.1e')} · {fmt('tokens_per_s', '.0f')} tok/s</div>"
    )


def _style(ax, title: str, size: float = 8) -> None:
    ax.set_facecolor(NEON["panel"])
    ax.set_title(title, color=NEON["cyan"], fontsize=size + 2, family="monospace", loc="left")
    ax.tick_params(colors=NEON["text"], labelsize=size, which="both")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for spine in ax.spines.values():
        spine.set_color(NEON["grid"])
    ax.grid(True, color=NEON["grid"], linewidth=0.5, alpha=0.6)


def figure(records: list[dict], target: float = PHI, narrow: bool = False):
    """Five panels of a run's metrics; an empty run gives empty panels with a note. narrow: one column, for a phone
    (the wide figure shrunk to a phone's width has unreadable labels)."""
    if narrow:
        fig, axes = plt.subplots(6, 1, figsize=(4.2, 15), dpi=90)
    else:
        fig, axes = plt.subplots(2, 3, figsize=(12, 6.2), dpi=90)
    fig.patch.set_facecolor(NEON["bg"])
    panels = axes.ravel()
    steps, loss = series(records, "loss")
    _style(panels[0], "loss")
    panels[0].plot(steps, loss, color=NEON["cyan"], linewidth=1.4)

    _alpha_panel(panels[1], records, target)
    _gate_panel(panels[2], records, target)

    steps_o, ortho = series(records, "ortho_error")
    _style(panels[3], r"orthogonality error $\|R^\top R - I\|$")
    positive = [(s, v) for s, v in zip(steps_o, ortho) if v > 0]
    if positive:
        panels[3].semilogy([p[0] for p in positive], [p[1] for p in positive], color=NEON["amber"], linewidth=1.2)

    steps_t, tps = series(records, "tokens_per_s")
    _style(panels[4], "tokens / s")
    panels[4].plot(steps_t, tps, color=NEON["blue"], linewidth=1.2)

    _phase_panel(panels[5], records)
    for ax in panels[:5]:
        ax.set_xlabel("step", color=NEON["dim"], fontsize=8)
    fig.tight_layout()
    return fig


def _legend(ax) -> None:
    ax.legend(loc="lower right", fontsize=8, facecolor=NEON["panel"], labelcolor=NEON["text"], edgecolor=NEON["grid"])


def _alpha_panel(ax, records: list[dict], target: float) -> None:
    """α against its target (φ unless the run set another)."""
    steps, alpha = series(records, "alpha")
    _style(ax, "α (gate logit)")
    ax.plot(steps, alpha, color=NEON["magenta"], linewidth=1.6, label="α")
    label = f"φ = {target:.4f}" if abs(target - PHI) < 1e-6 else f"target = {target:.4f}"
    ax.axhline(target, color=NEON["gold"], linestyle="--", linewidth=1.0, label=label)
    _legend(ax)


def _gate_panel(ax, records: list[dict], target: float) -> None:
    """The gate σ(α) against σ of the target."""
    steps, gate = series(records, "gate")
    _style(ax, "gate = σ(α)")
    ax.plot(steps, gate, color=NEON["green"], linewidth=1.6, label="gate")
    ax.axhline(
        gate_of(target), color=NEON["gold"], linestyle="--", linewidth=1.0, label=f"σ(φ) = {gate_of(target):.4f}"
    )
    ax.set_ylim(-0.02, 1.02)
    _legend(ax)


def _phase_panel(ax, records: list[dict]) -> None:
    """A text panel: the steps where the phase changed (the first eight), or that no metrics came yet."""
    ax.axis("off")
    phases = [(r["step"], r.get("phase")) for r in records if r.get("phase")]
    lines = ["phase changes:"] + [
        f"  step {s:>6}: {p}" for i, (s, p) in enumerate(phases) if i == 0 or phases[i - 1][1] != p
    ][:8]
    if not records:
        lines = ["no metrics yet:", "waiting for metrics.jsonl"]
    text = "\n".join(lines)
    ax.text(
        0.02,
        0.95,
        text,
        va="top",
        ha="left",
        family="monospace",
        fontsize=9,
        color=NEON["text"],
        transform=ax.transAxes,
    )


def render_png(fig) -> Image.Image:
    """The figure as an image, and the figure closed (a live monitor redraws every few seconds)."""
    from PIL import Image

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    finally:
        plt.close(fig)
    buf.seek(0)
    return Image.open(buf)


def fingerprint(run: Path | None) -> tuple | None:
    """What the figures of a run are drawn from (its metrics file's size and time, whether it has finished): the
    same fingerprint, the same figures, so a live monitor redraws only when a record arrives."""
    path = Path(run) / train_metrics.METRICS if run else None
    if path is None or not path.exists():
        return None
    stat = path.stat()
    return str(run), stat.st_size, stat.st_mtime_ns, (Path(run) / runs.SUMMARY).exists()


def badge(run: Path | None) -> str:
    if run is None or not Path(run).is_dir():
        return badge_html({}, None)
    return badge_html(status(run, train_metrics.read(Path(run))), run)


def snapshot(run: Path | None):
    """(badge HTML, wide plot, one-column plot) for a run directory, for the UI (which shows one of the two,
    by the screen's width)."""
    if run is None or not Path(run).is_dir():
        return badge_html({}, None), render_png(figure([])), render_png(figure([], narrow=True))
    records = train_metrics.read(Path(run))
    target = target_alpha(run)
    return (
        badge_html(status(run, records), run),
        render_png(figure(records, target)),
        render_png(figure(records, target, narrow=True)),
    )


class Monitor:
    """The Soul monitor tab: a run picker over the runs under --runs, the badge and figures of the picked run,
    refreshed every 2 s while live is on (the figures only when the run's metrics changed)."""

    def __init__(self, runs: Path | None):
        self.runs = runs

    def choices(self) -> list[str]:
        return [str(p) for p in list_runs(self.runs)] if self.runs else []

    def refresh_runs(self, current):
        import gradio as gr

        choices = self.choices()
        return gr.update(choices=choices, value=current if current in choices else (choices[0] if choices else None))

    def show(self, run, seen):
        """Badge and figures of a run; the figures only when its metrics changed since this page last got them."""
        import gradio as gr

        run = Path(run) if run else None
        key = fingerprint(run)
        if key is not None and key == seen:
            return badge(run), gr.skip(), gr.skip(), seen
        return *snapshot(run), key

    def tab(self, page) -> None:
        import gradio as gr

        if self.runs is None:
            gr.Markdown("start the UI with `--runs DIR` to watch the training runs under DIR")
        with gr.Row():
            page.run_dd = gr.Dropdown(label="run", choices=self.choices(), scale=4, min_width=200, elem_id="run-picker")
            page.runs_btn = gr.Button("⟳ runs", scale=1, min_width=100, variant="secondary")
            page.live = gr.Checkbox(value=True, label="live (refresh every 2 s)", scale=1, min_width=150)
        page.badge = gr.Markdown(elem_id="soul-badge")
        about = (
            "the run's loss, α with the φ line, the gate with σ(φ), the orthogonality error and tokens/s by step "
            "(the badge above has the latest values)"
        )
        # no floating label: it would cover the first panel's title (the figures carry their own titles)
        image = dict(label="soul metrics", show_label=False, type="pil", interactive=False, buttons=[], alt_text=about)
        page.plot = gr.Image(elem_id="soul-plot", **image)
        page.plot_tall = gr.Image(elem_id="soul-plot-tall", **image)
        page.timer = gr.Timer(2.0)
        page.drawn = gr.State(None)  # the fingerprint of the run whose figures this page shows

    def wire(self, page, demo) -> None:
        import gradio as gr

        page.runs_btn.click(self.refresh_runs, [page.run_dd], page.run_dd)
        shown = [page.badge, page.plot, page.plot_tall, page.drawn]
        page.run_dd.change(self.show, [page.run_dd, page.drawn], shown)
        demo.load(self.show, [page.run_dd, page.drawn], shown)
        page.timer.tick(self.show, [page.run_dd, page.drawn], shown, show_progress="hidden")
        page.live.change(lambda on: gr.Timer(active=on), page.live, page.timer)
