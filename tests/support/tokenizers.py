"""Edits to a copy of the embedded model's tokenizer that tests need."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def copy_with_stripping_markers(model_dir: Path, dest: Path) -> Path:
    """Copy the model to `dest` with Phi-3's whitespace rule: its turn markers swallow the newline after them
    (`rstrip` on every `<|...|>` added token but `<|endoftext|>`)."""
    shutil.copytree(model_dir, dest)
    path = dest / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for t in data["added_tokens"]:
        if t["content"].startswith("<|") and t["content"] != "<|endoftext|>":
            t["rstrip"] = True
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dest
