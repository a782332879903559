"""bench/cache_type.py measures what it says: the q8_0 cache really is in use (its logits differ from f16's, a
little), both read the same positions, and the memory figures follow llama.cpp's block sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support.fixtures import served_files  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[1]


def test_the_q8_0_cache_moves_the_logits_a_little_and_halves_the_bytes(served_files, tmp_path):  # noqa: F811
    gguf, _ = served_files
    out = tmp_path / "cache.json"
    cmd = [sys.executable, "bench/cache_type.py", "--gguf", str(gguf), "--ctx", "256", "--threads", "2"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    parity = result["parity"]
    assert parity["positions"] >= 256
    assert 0 < parity["kl_mean"] < 1e-2, parity  # 0 would mean both runs used the same cache
    assert parity["top1_agreement"] > 0.9, parity
    ppl = parity["perplexity"]
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.05, ppl
    per = result["memory"]["phi35_mini"]["bytes_per_position"]
    assert per == {"f16": 32 * 2 * 3072 * 2, "q8_0": 32 * 2 * 3072 * 34 / 32}
    slots = result["memory"]["this_gguf"]["slots_in_four_f16_slots"]
    assert slots["f16"] == 4 and slots["q8_0"] == 7
