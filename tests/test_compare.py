"""The recipe comparison (reports/recipe_comparison.py) runs both recipes for real (a few steps) and writes one report
with both rows."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "reports" / "recipe_comparison.py"
_spec = importlib.util.spec_from_file_location("recipe_comparison", SCRIPT)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def first_paragraphs(name: str, n: int, dest: Path) -> Path:
    """A small slice of a corpus file, so the test scores a few paragraphs instead of the whole file."""
    from aegis.tiny import corpus_path, paragraphs

    dest.write_text("\n\n".join(paragraphs(corpus_path(name))[:n]) + "\n", encoding="utf-8")
    return dest


def committed_report() -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(compare.COMMITTED.glob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A quick look as a user runs it: no --out, from their own directory."""
    root = tmp_path_factory.mktemp("compare")
    held = first_paragraphs("prose_eval.txt", 8, root / "held.txt")
    seen = first_paragraphs("prose_train_c.txt", 8, root / "seen.txt")
    before = committed_report()
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--steps",
            "6",
            "--data",
            str(held),
            "--train-data",
            str(seen),
            "--set",
            "train.max_length=128",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc, before


def test_a_quick_look_leaves_the_committed_report_alone(report):
    root, proc, before = report
    assert before and committed_report() == before
    assert (root / "runs" / "compare" / "recipe_comparison.md").is_file()
    assert not list((root / "runs" / "compare").glob(".tmp-*"))


def test_report_has_both_rows(report):
    root, proc, _ = report
    out = root / "runs" / "compare"
    md = (out / "recipe_comparison.md").read_text(encoding="utf-8")
    data = json.loads((out / "recipe_comparison.json").read_text(encoding="utf-8"))
    assert set(data["recipes"]) == {"aegis", "seed"}
    assert data["steps"] == 6 and data["data"] == [str(root / "held.txt")]
    for name, init, mix in (("aegis", "identity", "interpolate"), ("seed", "random", "residual")):
        r = data["recipes"][name]
        assert (r["init"], r["mix"]) == (init, mix)
        assert r["gate"] == pytest.approx(0.8345, abs=1e-4)  # the short schedule still ends at φ
        assert math.isfinite(r["perplexity"])
        assert r["ratio_to_base"] == pytest.approx(r["perplexity"] / data["base"]["perplexity"])
        title = compare.RECIPES[name]["title"]
        assert f"| {title} | {init} | {mix} |" in md
        assert f"{r['perplexity']:.3f}" in md
        # each run went through the real entry point and left its metrics and final checkpoint
        assert (out / name / "final" / "soul.safetensors").is_file()
        assert len((out / name / "metrics.jsonl").read_text().splitlines()) == 6
        # the text it trained on, scored for contrast, with its own base row
        t = r["train_text"]
        assert t["base"]["loss"] == pytest.approx(data["train_base"]["loss"], abs=1e-4)
        assert f"| {title} | {t['checkpoint']['ratio_to_base']:.3f} | {t['gate_shut']['ratio_to_base']:.3f} |" in md
    assert data["train_data"] == [str(root / "seen.txt")]
    assert "| base (no adapter, no soul) |" in md and f"{data['base']['perplexity']:.3f}" in md
    assert data["goal"]["met"] == (data["recipes"]["aegis"]["ratio_to_base"] <= 1.05)
    assert (out / "recipe_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Goal" in proc.stdout
    assert data["command"] == "python reports/recipe_comparison.py --steps 6" and data["work_dir"] == str(out)


def test_defaults_score_the_corpus_held_out_prose():
    assert compare.DEFAULT_DATA == ["embedded:prose_eval.txt"]
    assert compare.DEFAULT_TRAIN_DATA == ["embedded:prose_train_c.txt"]


def test_schedule_shrinks_in_proportion():
    from aegis.config import Config

    assert compare.schedule_overrides(Config(), 20) == [
        "schedule.total_steps=20",
        "schedule.warmup_steps=2",
        "schedule.anneal_steps=16",
    ]
    assert compare.schedule_overrides(Config(), None) == []


def test_the_committed_report_is_rewritten_only_when_asked():
    """--update-report is the one way to reports/; --out is a separate place and defaults to runs/compare."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    ).stdout
    assert "--update-report" in out and "runs/compare" in out
    assert compare.COMMITTED == REPO / "reports" and compare.DEFAULT_OUT == Path("runs/compare")


def test_recipe_keys_are_not_overridable(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--set", "soul.mix=residual", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "soul.mix" in proc.stderr
