"""The Modelfile's Go template renders chats exactly as the tokenizer's chat template does (checked with a renderer
of the Go template subset), the committed Borea Modelfile is that template, and the renderer follows Go's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from export import gotemplate, modelfile

ROOT = Path(__file__).resolve().parents[1]
CHATS = [
    [{"role": "user", "content": "こんにちは"}],
    [{"role": "system", "content": "丁寧に。"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  leading and trailing spaces  "}],
    [{"role": "user", "content": "複数行の\n\n質問です。\n"}],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.mark.parametrize("chat", CHATS)
def test_template_is_token_identical_to_chat_template(tokenizer, chat):
    result = modelfile.check_template(modelfile.PHI3_TEMPLATE, tokenizer, chat)
    assert result["text_equal"], (result["go_text"], result["hf_text"])
    assert result["ok"]


def test_committed_borea_modelfile(tokenizer):
    path = ROOT / "modelfiles" / "agiasi_borea.modelfile"
    cmds = modelfile.parse(path.read_text(encoding="utf-8"), str(path))
    assert dict((c, a) for c, a in cmds if c != "PARAMETER")["TEMPLATE"] == modelfile.PHI3_TEMPLATE
    params = [a for c, a in cmds if c == "PARAMETER"]
    assert {'stop "<|end|>"', 'stop "<|user|>"', 'stop "<|assistant|>"', 'stop "<|system|>"',
            "num_ctx 4096"} <= set(params)
    (from_path,) = [a for c, a in cmds if c == "FROM"]
    assert from_path.endswith(".gguf") and not Path(from_path).is_absolute()


def test_modelfile_command(tiny_path, tmp_path):
    import subprocess
    import sys

    from export.to_gguf import write_gguf

    gguf = tmp_path / "g" / "tiny-f16.gguf"
    write_gguf(tiny_path, gguf, "f16", progress=False, log=lambda *_: None)
    out = tmp_path / "modelfiles" / "tiny.modelfile"
    proc = subprocess.run([sys.executable, "-m", "export", "modelfile", "--gguf", str(gguf), "--name", "tiny",
                           "--out", str(out), "--model", str(tiny_path), "--system", "短く答えて。"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    cmds = modelfile.parse(out.read_text())
    assert ("FROM", "../g/tiny-f16.gguf") in cmds and ("SYSTEM", "短く答えて。") in cmds
    assert ("PARAMETER", "num_ctx 512") in cmds  # the GGUF's original (short-factor) context


def test_go_template_rules():
    render = gotemplate.render
    assert render("a  {{- .X -}}  b", {"X": "x"}) == "axb"
    assert render("a {{ .X }} b", {"X": "x"}) == "a x b"
    assert render("{{/* note */}}{{ if .X }}yes{{ else }}no{{ end }}", {"X": ""}) == "no"
    assert render('{{ if eq .R "u" }}U{{ else if eq .R "a" }}A{{ else }}?{{ end }}', {"R": "a"}) == "A"
    assert render("{{ range $i, $m := .M }}{{ $i }}{{ $m.C }}{{ end }}", {"M": [{"C": "x"}, {"C": "y"}]}) == "0x1y"
    assert render("{{ range .M }}{{ .C }}{{ else }}none{{ end }}", {"M": []}) == "none"
    assert render("{{ range .M }}{{ $.S }}{{ end }}", {"M": [1, 2], "S": "s"}) == "ss"
    assert render('{{ if and .A (not .B) }}ok{{ end }}', {"A": 1, "B": 0}) == "ok"
    assert render('{{ len .M }}', {"M": [1, 2, 3]}) == "3"
    assert render('{{ "a\\nb" }}', {}) == "a\nb"
    for bad in ("{{ if .X }}no end", "{{ end }}", "{{ with .X }}{{ end }}", "{{ .X | printf }}"):
        with pytest.raises(gotemplate.TemplateError):
            render(bad, {"X": 1})
