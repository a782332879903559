"""Recipe comparison on the embedded model, the report beside this script (an experiment, not part of the product):

    python reports/recipe_comparison.py [--steps N] [--out DIR] [--update-report]

Runs the seed schedule twice through the real training entry point (`python -m train`), once with the AEGIS
recipe (soul.init = identity, soul.mix = interpolate) and once with the seed code's (soul.init = random,
soul.mix = residual), then measures held-out perplexity of the base and of both results on the corpus's
held-out prose and writes one report: recipe_comparison.md, .json and .png (loss, α and gate against step).

The runs and the report go to --out (default runs/compare, like any run directory). The committed report under
reports/ is rewritten only when asked with --update-report, so a quick look (--steps 20) never replaces the
figures the README and the docs quote.

The retention goal for AEGIS: held-out perplexity at most 5 % above the base's (ratio <= 1.05) while the gate
ends at sigmoid(φ) = 0.8345. The seed recipe is reported beside it, whatever it comes to.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from aegis import atomic, checkpoint, metrics, schedule
from aegis.config import load
from aegis.errors import AegisError
from train.data import resolve
from train.eval import Evaluator

REPO = Path(__file__).resolve().parent.parent
COMMAND = "python reports/recipe_comparison.py"
DEFAULT_CONFIG = REPO / "configs" / "quickstart.toml"
DEFAULT_DATA = ["embedded:prose_eval.txt"]
# Text the runs trained on, scored beside the held-out text: a recipe that fits its training text while it
# loses held-out text is overfitting rather than retaining.
DEFAULT_TRAIN_DATA = ["embedded:prose_train_c.txt"]
RETENTION_LIMIT = 1.05  # AEGIS may be at most 5 % worse than the base on held-out text
GATE_GOAL = 0.83
RECIPES = {
    "aegis": {"title": "AEGIS", "init": "identity", "mix": "interpolate"},
    "seed": {"title": "seed code", "init": "random", "mix": "residual"},
}
REPORT = "recipe_comparison"
COMMITTED = REPO / "reports"  # the report the docs quote: written only with --update-report
DEFAULT_OUT = Path("runs") / "compare"


def schedule_overrides(cfg, steps: int | None) -> list[str]:
    """--set values that shrink the schedule to `steps`, keeping warmup and anneal in proportion."""
    s = cfg.schedule
    if steps is None or steps == s.total_steps:
        return []
    warmup = round(s.warmup_steps * steps / s.total_steps)
    # at least the last step sits at the target, as in the full schedule (step k uses α of index k - 1)
    anneal = max(1, min(steps - warmup - 1, round(s.anneal_steps * steps / s.total_steps)))
    warmup = min(warmup, steps - anneal - 1) if steps > anneal + 1 else 0
    return [f"schedule.total_steps={steps}", f"schedule.warmup_steps={warmup}", f"schedule.anneal_steps={anneal}"]


class RunFailed(AegisError):
    """A recipe's training run exited with an error (its stderr ends the message)."""


def train_once(config: Path, run_dir: Path, overrides: list[str], log) -> float:
    """One run through `python -m train` in a fresh process (as a user would start it); returns seconds."""
    cmd = [sys.executable, "-m", "train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    log("$ " + " ".join(cmd))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunFailed(f"training run {run_dir} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.time() - t0


def plot(runs: dict[str, list[dict]], path: Path, target_alpha: float) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    colors = {"aegis": "tab:blue", "seed": "tab:red"}
    styles = {"aegis": "-", "seed": "--"}  # α and gate coincide for both recipes; dashes keep both visible
    for name, recs in runs.items():
        steps = [r["step"] for r in recs]
        loss = [metrics.number(r["loss"]) for r in recs]
        window = 20
        smooth = [
            sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1])
            for i in range(len(loss))
        ]
        label = RECIPES[name]["title"]
        axes[0].plot(steps, loss, color=colors[name], alpha=0.2, linewidth=0.8)
        axes[0].plot(steps, smooth, color=colors[name], label=f"{label} (mean of {window})")
        axes[1].plot(steps, [r["alpha"] for r in recs], color=colors[name], linestyle=styles[name], label=label)
        axes[2].plot(steps, [r["gate"] for r in recs], color=colors[name], linestyle=styles[name], label=label)
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel("α")
    axes[1].axhline(target_alpha, color="gray", linestyle=":", linewidth=1)
    axes[2].set_ylabel("gate = sigmoid(α)")
    axes[2].axhline(schedule.gate(target_alpha), color="gray", linestyle=":", linewidth=1)
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("Recipe comparison on the embedded model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it (reports are committed)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def markdown(rep: dict) -> str:
    base = rep["base"]
    goal = rep["goal"]
    lines = [
        "# Recipe comparison: AEGIS vs the seed code",
        "",
        f"Generated {rep['generated']} by `{rep['command']}`: {rep['steps']} steps of the seed schedule "
        f"(α from {rep['schedule']['start_alpha']} to {rep['schedule']['target_alpha']:.4f} over steps "
        f"{rep['schedule']['warmup_steps'] + 1}-{rep['schedule']['warmup_steps'] + rep['schedule']['anneal_steps']})"
        f" on the embedded tiny Phi-3 ({rep['quantization']}), config `{rep['config']}`, both runs through "
        "`python -m train` with the same seed and data order.",
        "",
        f"Held-out data: {', '.join(rep['data'])} ({base['tokens']} labelled tokens; each paragraph scored on its "
        "own). Perplexity = exp(token-weighted mean loss). The base is the same 4-bit weights the adapters sit on.",
        "",
        "| recipe | soul.init | soul.mix | final gate | held-out loss | held-out perplexity | ratio to base "
        "| gate shut (LoRA only): ppl (ratio) | train loss, last 20 steps |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| base (no adapter, no soul) | – | – | – | {base['loss']:.4f} | {base['perplexity']:.3f} | 1.000 | – | – |",
    ]
    for name, r in rep["recipes"].items():
        lines.append(
            f"| {RECIPES[name]['title']} | {r['init']} | {r['mix']} | {r['gate']:.4f} "
            f"| {r['loss']:.4f} | {r['perplexity']:.3f} | {r['ratio_to_base']:.3f} "
            f"| {r['gate_shut']['perplexity']:.3f} ({r['gate_shut']['ratio_to_base']:.3f}) "
            f"| {r['train_loss_last20']:.4f} |"
        )
    verdict = "met" if goal["met"] else "NOT met"
    lines += [
        "",
        f"**Goal** (AEGIS held-out perplexity ≤ {RETENTION_LIMIT:.2f} × base while the gate ends ≥ {GATE_GOAL}): "
        f"**{verdict}** — ratio {goal['ratio']:.3f}, gate {goal['gate']:.4f}.",
        "",
        f"Text the runs trained on ({', '.join(rep['train_data'])}), for contrast — ratio to the base's "
        f"perplexity of {rep['train_base']['perplexity']:.3f}:",
        "",
        "| recipe | checkpoint | gate shut (LoRA only) |",
        "|---|---|---|",
    ]
    for name, r in rep["recipes"].items():
        t = r["train_text"]
        lines.append(
            f"| {RECIPES[name]['title']} | {t['checkpoint']['ratio_to_base']:.3f} "
            f"| {t['gate_shut']['ratio_to_base']:.3f} |"
        )
    lines += [
        "",
        f"![loss, α and gate against step]({REPORT}.png)",
        "",
        "*checkpoint*: base + LoRA + soul as trained (gate at its final value). *gate shut*: the same checkpoint "
        "with g = 0, i.e. what LoRA alone does; the gap between the two is the soul's share. With "
        "mix = interpolate a shut gate is exactly the base head; with mix = residual the head sees h + g·R·h, "
        "at g = 0.83 a hidden state up to 1.83 times as long (sharper logits), which LoRA then leans on.",
        "",
        f"Reproduce: `{rep['command']}` (the runs go to `{rep['work_dir']}`; this report took "
        f"{rep['minutes']:.0f} minutes on a shared 2-core CPU, a few minutes on an idle one).",
        "",
    ]
    return "\n".join(lines)


def write_report(directory: Path, report: dict, histories: dict[str, list[dict]], target_alpha: float) -> None:
    """The report's three files, each written whole (aegis/atomic.py)."""
    atomic.write_json(directory / f"{REPORT}.json", report)
    atomic.write_text(directory / f"{REPORT}.md", markdown(report))
    with atomic.atomic_file(directory / f"{REPORT}.png") as tmp:
        plot(histories, tmp, target_alpha)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog=COMMAND,
        description="Train the AEGIS and the seed recipe on the embedded model and write a held-out perplexity report.",
    )
    ap.add_argument("--steps", type=int, default=None, help="total steps of each run (default: the config's, 500)")
    ap.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="base config (default: configs/quickstart.toml, the embedded model)",
    )
    ap.add_argument(
        "--data", action="append", default=None, metavar="SOURCE", help=f"held-out data (default: {DEFAULT_DATA[0]})"
    )
    ap.add_argument(
        "--train-data",
        action="append",
        default=None,
        metavar="SOURCE",
        help=f"training text scored for contrast (default: {DEFAULT_TRAIN_DATA[0]})",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"where the two training runs (OUT/aegis, OUT/seed; replaced on each call) and the report "
        f"go (default: {DEFAULT_OUT})",
    )
    ap.add_argument(
        "--update-report",
        action="store_true",
        help="also rewrite the committed report, reports/recipe_comparison.* (the figures the docs quote)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra config override for both runs (repeatable)",
    )
    args = ap.parse_args(argv)
    args.out = args.out.resolve()  # the runs start in the repository; a relative --out means the caller's directory
    if args.steps is not None and args.steps < 2:
        ap.error("--steps must be at least 2")
    bad = [o for o in args.overrides if o.split("=", 1)[0].strip() in ("soul.init", "soul.mix")]
    if bad:
        ap.error(f"--set {bad[0]}: the recipes differ exactly in soul.init and soul.mix; they are not overridable")
    args.data = args.data or DEFAULT_DATA
    args.train_data = args.train_data or DEFAULT_TRAIN_DATA
    return args


def prepare(args: argparse.Namespace) -> tuple:
    """The config both runs share and their --set values; every data source resolved before any training."""
    cfg = load(args.config, args.overrides)
    common = args.overrides + schedule_overrides(cfg, args.steps)
    cfg = load(args.config, common)  # validates the shortened schedule too
    for source in args.data + args.train_data:
        resolve(source)
    steps = cfg.schedule.total_steps
    return cfg, common + [f"train.save_steps={steps}", "train.keep_last=1"]  # only each run's end is evaluated


def run_recipe(name: str, args: argparse.Namespace, common: list[str], log) -> tuple[dict, list[dict]]:
    """One recipe: a fresh training run, then its final checkpoint scored; (its report row, its metrics)."""
    recipe = RECIPES[name]
    run_dir = args.out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run every time: the report must come from this code
    seconds = train_once(
        args.config, run_dir, common + [f"soul.init={recipe['init']}", f"soul.mix={recipe['mix']}"], log
    )
    final = run_dir / checkpoint.FINAL
    log(f"{recipe['title']}: trained in {seconds:.0f}s; evaluating {final}")
    evaluator = Evaluator(final)
    ev = evaluator.run(args.data, log=log)
    tr = evaluator.run(args.train_data, log=log)
    recs = metrics.read(run_dir)
    last20 = [metrics.number(r["loss"]) for r in recs[-20:]]
    res = ev["results"]
    row = {
        "init": recipe["init"],
        "mix": recipe["mix"],
        "alpha": ev["alpha"],
        "gate": ev["gate"],
        "loss": res["checkpoint"]["loss"],
        "perplexity": res["checkpoint"]["perplexity"],
        "ratio_to_base": res["checkpoint"]["ratio_to_base"],
        "gate_shut": res["gate_shut"],
        "base": res["base"],
        "train_text": tr["results"],
        "train_loss_last20": sum(last20) / len(last20),
        "ortho_error": recs[-1]["ortho_error"],
        "rotation_norm": recs[-1]["rotation_norm"],
        "train_seconds": round(seconds, 1),
        "run_dir": shown(run_dir),
    }
    return row, recs


def conclude(report: dict) -> None:
    """The base rows both runs share (they must agree: the same base in the same quantization), and the goal."""
    for key, pick in (("base", lambda r: r["base"]), ("train_base", lambda r: r["train_text"]["base"])):
        rows = [pick(r) for r in report["recipes"].values()]
        if abs(rows[0]["loss"] - rows[1]["loss"]) > 1e-4:
            raise RunFailed(f"the two runs disagree on the base's loss ({rows[0]['loss']} vs {rows[1]['loss']})")
        report[key] = rows[0]
    a = report["recipes"]["aegis"]
    report["goal"] = {
        "ratio_limit": RETENTION_LIMIT,
        "gate_goal": GATE_GOAL,
        "ratio": a["ratio_to_base"],
        "gate": a["gate"],
        "met": a["ratio_to_base"] <= RETENTION_LIMIT and a["gate"] >= GATE_GOAL,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        cfg, common = prepare(args)
    except AegisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_start = time.time()
    command = (
        COMMAND + (f" --steps {args.steps}" if args.steps else "") + (" --update-report" if args.update_report else "")
    )
    report = {
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "config": shown(args.config),
        "overrides": args.overrides,
        "steps": cfg.schedule.total_steps,
        "base_model": cfg.model.base,
        "quantization": cfg.model.quantization,
        "data": args.data,
        "train_data": args.train_data,
        "work_dir": shown(args.out),
        "schedule": {k: getattr(cfg.schedule, k) for k in cfg.schedule.__dataclass_fields__},
        "recipes": {},
    }
    histories = {}
    try:
        for name in RECIPES:
            report["recipes"][name], histories[name] = run_recipe(name, args, common, log)
        conclude(report)
    except AegisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report["minutes"] = (time.time() - t_start) / 60
    for directory in [args.out] + ([COMMITTED] if args.update_report else []):
        write_report(directory, report, histories, cfg.schedule.target_alpha)
        log(f"report written to {directory / REPORT}.md, .json, .png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
