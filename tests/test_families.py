"""Every family the config accepts (lora.target_modules = "auto": Phi-3, Llama, Mistral, Qwen2) end to end on a small
model of that family built here (tests/support/families.py): `python -m train` → `python -m export all` with every
GGUF type (merge, GGUF, parity, and the Modelfile whose template is proved against the family's chat template) →
`python -m serve` answering through the API exactly as the merged model does. Tied embeddings (Llama, Qwen2) and
q/k/v biases (Qwen2) included. An architecture AEGIS does not support is refused by `train` before any weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import SHORT, train_cli
from export import names
from support import families
from support.modelfile_text import parse

ROOT = Path(__file__).resolve().parents[1]
TYPES = list(names.TYPES)
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "日本の首都はどこですか？"}]


@pytest.fixture(scope="module", params=list(families.FAMILIES))
def exported(request, tiny_path, tmp_path_factory) -> dict:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = families.build_model(family, root / f"tiny-{family}", tiny_path)
    run = root / "run"
    train_cli(run, *SHORT, f"model.base={base}", *families.TRAIN_OVERRIDES.get(family, []))
    out = run / "export"
    proc = subprocess.run([sys.executable, "-m", "export", "all", "--run", str(run), "--type", ",".join(TYPES),
                           "--name", family, "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"export failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return {"family": family, "base": base, "run": run, "out": out, "stdout": proc.stdout,
            "parity": json.loads((out / "parity.json").read_text()),
            "summary": json.loads((out / "export.json").read_text())}


def test_every_type_passes_parity(exported):
    parity = exported["parity"]
    for t in TYPES:
        entry = parity[f"{exported['family']}-{t}.gguf"]
        assert entry["passed"], (t, entry["failures"])
        assert entry["template"]["ok"], t  # the GGUF's chat template tokenizes in llama.cpp as in HF
    assert parity[f"{exported['family']}-f32.gguf"]["overall"]["top1"] == 1.0


def test_gguf_holds_the_familys_tensors(exported):
    import gguf

    family = exported["family"]
    reader = gguf.GGUFReader(str(exported["out"] / f"{family}-f32.gguf"))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == names.arch_name(family) == {"mistral": "llama"}.get(family, family)
    tensors = {t.name for t in reader.tensors}
    assert "output.weight" in tensors  # a tied head is untied by the merge: the soul rotates the head only
    assert ("blk.0.attn_q.bias" in tensors) == (family == "qwen2")
    assert ("blk.0.attn_qkv.weight" in tensors) == (family == "phi3")
    merged = json.loads((exported["out"] / "merged" / "aegis_export.json").read_text())
    assert merged["untied_head"] == families.FAMILIES[family][1]["tie_word_embeddings"]


def test_modelfile_has_the_familys_own_template(exported):
    from transformers import AutoTokenizer

    from export import chat_formats

    fmt = families.CHAT_FORMATS[families.FAMILIES[exported["family"]][0]][-1]
    proof = exported["summary"]["template"]
    assert proof["ok"] and proof["format"] == fmt
    assert proof["tokenizers"] == ["the HF tokenizer", "the GGUF's llama.cpp vocabulary"]
    assert f"template    chat template: {fmt}; the Modelfile template renders" in exported["stdout"]
    cmds = parse((exported["out"] / f"{exported['family']}.modelfile").read_text())
    template = dict(c for c in cmds if c[0] == "TEMPLATE")["TEMPLATE"]
    tok = AutoTokenizer.from_pretrained(exported["out"] / "merged")
    assert chat_formats.derive(tok, "merged").template == template
    stops = {a.split(" ", 1)[1].strip('"') for c, a in cmds if c == "PARAMETER" and a.startswith("stop ")}
    assert tok.eos_token in stops and not ("<|end|>" in stops and exported["family"] != "phi3")


def test_served_answer_is_the_merged_models(exported, tmp_path):
    """The f32 GGUF served through the API answers the chat greedily with the merged model's own tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from support.serving import Server

    merged = exported["out"] / "merged"
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)
    want = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    gguf = exported["out"] / f"{exported['family']}-f32.gguf"
    with Server("--model", f"fam={gguf}", "--parallel", "1", "--threads", "1", log_path=tmp_path / "serve.log") as s:
        r = httpx.post(s.api + "/chat/completions", timeout=120, json={
            "model": "fam", "messages": CHAT, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == ids["input_ids"].shape[1]
    assert body["choices"][0]["message"]["content"] == want


def test_unsupported_architecture_is_refused_before_loading(tmp_path):
    base = tmp_path / "gemma2"
    base.mkdir()
    # Only a config: were the weights loaded, this would fail differently (there are none).
    (base / "config.json").write_text(json.dumps({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}))
    proc = train_cli(tmp_path / "run", *SHORT, f"model.base={base}", check=False)
    assert proc.returncode == 2
    assert f"{base / 'config.json'}: model_type 'gemma2'" in proc.stderr
    assert "phi3, llama, mistral, qwen2" in proc.stderr and "Traceback" not in proc.stderr
    (base / "config.json").write_text(json.dumps({"model_type": "llama",
                                                  "architectures": ["LlamaForSequenceClassification"]}))
    proc = train_cli(tmp_path / "run2", *SHORT, f"model.base={base}", check=False)
    assert proc.returncode == 2 and "LlamaForSequenceClassification" in proc.stderr


def test_train_and_export_agree_on_the_families():
    from aegis.loading import AUTO_TARGETS

    assert set(AUTO_TARGETS) == set(names.FAMILIES) == set(families.FAMILIES)
