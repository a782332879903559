"""The Modelfile's Go template comes from the model's own chat template: for every chat format AEGIS supports, a
tokenizer built here with that family's template and special tokens gets the right format, and the proof renders
every conversation through the Go template (with the Go-template renderer) and through transformers'
apply_chat_template to identical tokens. A template no format reproduces is an error, never a Phi-3 fallback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from aegis import families as registry
from export import chat_formats, gotemplate, modelfile
from export.files import ExportError
from support import families
from support.modelfile_text import parse

ROOT = Path(__file__).resolve().parents[1]
FORMATS = [f for f, spec in families.CHAT_FORMATS.items() if spec[-1] is not None]


@pytest.fixture(scope="module")
def tokenizers(tiny_path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("formats")
    return {f: families.build_tokenizer(f, root / f, tiny_path) for f in families.CHAT_FORMATS}


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_family_gets_its_own_template_token_for_token(tokenizers, fmt):
    tok = _tok(tokenizers[fmt])
    proof = chat_formats.derive(tok, fmt)
    assert proof.format == families.CHAT_FORMATS[fmt][-1]
    # Every conversation of the proof, rendered both ways here again and tokenized as the runtime does.
    adds_bos = tok("a")["input_ids"][:1] == [tok.bos_token_id]
    checked = 0
    for name, conv in chat_formats.PROOF:
        try:
            want = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
        except Exception:
            assert not proof.system and any(m["role"] == "system" for m in conv), name
            continue
        got = chat_formats.render_go(proof.template, conv)
        ids = tok((tok.bos_token if adds_bos else "") + got, add_special_tokens=False)["input_ids"]
        assert ids == want["input_ids"], (fmt, name, got)
        checked += 1
    proved = [c["name"] for c in proof.conversations]
    assert checked >= 3 and checked == len([n for n, _ in chat_formats.PROOF if n in proved])
    # The stops end the family's turns: its end-of-turn marker and its end-of-sequence token.
    assert tok.eos_token in proof.stops
    end_of_turn = {"Phi-3": "<|end|>", "ChatML": "<|im_end|>", "Llama 3": "<|eot_id|>", "Gemma": "<end_of_turn>"}
    for key, marker in end_of_turn.items():
        if proof.format.startswith(key):
            assert marker in proof.stops


def test_whitespace_trimming_and_refused_system_are_reported(tokenizers):
    assert chat_formats.derive(_tok(tokenizers["chatml"]), "chatml").notes == []
    llama3 = chat_formats.derive(_tok(tokenizers["llama3"]), "llama3")
    assert any("strips whitespace" in n for n in llama3.notes) and llama3.system
    gemma = chat_formats.derive(_tok(tokenizers["gemma-no-system"]), "gemma")
    assert not gemma.system and any("refuses system messages" in n for n in gemma.notes)


def test_a_template_no_format_reproduces_is_an_error(tokenizers):
    with pytest.raises(chat_formats.ChatFormatError, match=r"alpaca: no Ollama template .* renders this chat template"):
        chat_formats.derive(_tok(tokenizers["alpaca"]), "alpaca")
    # ChatML's tokens with a template that differs in one place: the closest format and the difference are named.
    tok = _tok(tokenizers["chatml"])
    tok.chat_template = families.CHATML.replace("'\n' + message['content']", "':\n' + message['content']")
    assert tok.chat_template != families.CHATML
    with pytest.raises(
        chat_formats.ChatFormatError,
        match=r"closest: ChatML .*the Modelfile renders .*user\\n.*"
        r"the chat template .*user:\\n",
    ):
        chat_formats.derive(tok, "edited")
    tok.chat_template = None
    with pytest.raises(chat_formats.ChatFormatError, match="has no chat template"):
        chat_formats.derive(tok, "none")


def test_committed_borea_modelfile(tiny_path):
    """Borea is Phi-3.5: its committed Modelfile holds the template derived for the Phi-3 chat format."""
    path = ROOT / "modelfiles" / "agiasi_borea.modelfile"
    cmds = parse(path.read_text(encoding="utf-8"), str(path))
    proof = chat_formats.derive(_tok(tiny_path), "tiny")
    assert dict((c, a) for c, a in cmds if c != "PARAMETER")["TEMPLATE"] == proof.template
    params = [a for c, a in cmds if c == "PARAMETER"]
    assert {f'stop "{s}"' for s in proof.stops} | {"num_ctx 4096"} <= set(params)
    (from_path,) = [a for c, a in cmds if c == "FROM"]
    assert from_path.endswith(".gguf") and not Path(from_path).is_absolute()


def test_modelfile_command(tiny_path, tmp_path):
    """`export modelfile` on a ChatML model writes ChatML (not Phi-3), proved with the GGUF's llama.cpp vocabulary."""
    from export.to_gguf import write_gguf

    model = families.build_model("qwen2", tmp_path / "qwen2", tiny_path)
    gguf = tmp_path / "g" / "q-f16.gguf"
    write_gguf(model, gguf, "f16", progress=False, log=lambda *_: None)
    out = tmp_path / "modelfiles" / "q.modelfile"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "modelfile",
            "--gguf",
            str(gguf),
            "--name",
            "q",
            "--out",
            str(out),
            "--model",
            str(model),
            "--system",
            "短く答えて。",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ChatML (default system prompt)" in proc.stdout and "the GGUF's llama.cpp vocabulary" in proc.stdout
    cmds = parse(out.read_text())
    assert ("FROM", "../g/q-f16.gguf") in cmds and ("SYSTEM", "短く答えて。") in cmds
    assert ("PARAMETER", 'stop "<|im_end|>"') in cmds and ("PARAMETER", "num_ctx 1024") in cmds
    assert not [c for c in cmds if c[0] == "PARAMETER" and "<|end|>" in c[1]]
    template = dict(c for c in cmds if c[0] == "TEMPLATE")["TEMPLATE"]
    assert "<|im_start|>" in template and "<|user|>" not in template
    # Without --model and no merged/ beside the GGUF, the command asks for it rather than guessing.
    proc = subprocess.run(
        [sys.executable, "-m", "export", "modelfile", "--gguf", str(gguf), "--name", "q", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and "--model is needed" in proc.stderr


def test_system_prompt_refused_where_the_chat_template_refuses_it(tiny_path, tmp_path):
    from export.to_gguf import write_gguf

    model = families.build_model("llama", tmp_path / "m", tiny_path, chat_format="gemma-no-system")
    write_gguf(model, tmp_path / "m.gguf", "f16", progress=False, log=lambda *_: None)
    assert modelfile.build(tmp_path / "m.gguf", model, log=lambda *_: None).proof.format == "Gemma"
    with pytest.raises(ExportError, match="--system: .* refuses system messages"):
        modelfile.build(tmp_path / "m.gguf", model, system="be brief", log=lambda *_: None)


def test_go_template_rules():
    render = gotemplate.render
    assert render("a  {{- .X -}}  b", {"X": "x"}) == "axb"
    assert render("a {{ .X }} b", {"X": "x"}) == "a x b"
    assert render("{{/* note */}}{{ if .X }}yes{{ else }}no{{ end }}", {"X": ""}) == "no"
    assert render('{{ if eq .R "u" }}U{{ else if eq .R "a" }}A{{ else }}?{{ end }}', {"R": "a"}) == "A"
    assert render("{{ range $i, $m := .M }}{{ $i }}{{ $m.C }}{{ end }}", {"M": [{"C": "x"}, {"C": "y"}]}) == "0x1y"
    assert render("{{ range .M }}{{ .C }}{{ else }}none{{ end }}", {"M": []}) == "none"
    assert render("{{ range .M }}{{ $.S }}{{ end }}", {"M": [1, 2], "S": "s"}) == "ss"
    assert render("{{ if and .A (not .B) }}ok{{ end }}", {"A": 1, "B": 0}) == "ok"
    assert render("{{ len .M }}", {"M": [1, 2, 3]}) == "3"
    assert render("{{ range $i, $_ := .M }}{{ if gt $i 0 }},{{ end }}{{ $i }}{{ end }}", {"M": "abc"}) == "0,1,2"
    assert render("{{ $f := index .M 0 }}{{ $f.C }}{{ len (slice .M 1) }}", {"M": [{"C": "x"}, 2]}) == "x1"
    assert render('{{ "a\\nb" }}', {}) == "a\nb"
    for bad in ("{{ if .X }}no end", "{{ end }}", "{{ with .X }}{{ end }}", "{{ .X | printf }}"):
        with pytest.raises(gotemplate.TemplateError):
            render(bad, {"X": 1})


def _format_of(family) -> str:
    """The CHAT_FORMATS key of a registered family's own chat format."""
    return next(k for k, spec in families.CHAT_FORMATS.items() if spec[5] == family.chat_template)


@pytest.mark.parametrize("name", list(registry.FAMILIES))
def test_template_writes_tools_as_the_server_does(tokenizers, name):
    """The Modelfile's template writes Ollama's tools, calls and tool results in the family's tool format
    (aegis/tool_format.py: AEGIS's JSON one for Phi-3, Llama 3's, Mistral's, Hermes <tool_call> for Qwen2), so a
    model that learned tool calls from the server's prompts sees the same text under Ollama. Tools given with their
    keys in the order Go writes them (struct fields; map keys sorted). Ollama's template data has no call ids: the
    Mistral ids the server writes are the one difference."""
    import msgspec

    from aegis import chat_template
    from serve import prompt
    from serve.schemas import ChatCompletionRequest

    family = registry.FAMILIES[name]
    fmt = family.tool_format
    tok = _tok(tokenizers[_format_of(family)])
    template = chat_formats.derive(tok, name).template
    assert "$.Tools" in template
    weather = {
        "type": "object",
        "required": ["city"],
        "properties": {"city": {"type": "string", "description": "都市の名前"}},
    }
    tools = [
        {"type": "function", "function": {"name": "get_weather", "description": "天気予報", "parameters": weather}},
        {
            "type": "function",
            "function": {"name": "ping", "parameters": {"type": "object", "required": [], "properties": {}}},
        },
    ]
    call = {"name": "get_weather", "arguments": {"city": "東京"}}
    for system in ("丁寧に答えてください。", None):
        head = [{"role": "system", "content": system}] if system else []
        request = msgspec.json.decode(
            msgspec.json.encode(
                {
                    "model": "m",
                    "tools": tools,
                    "messages": head
                    + [
                        {"role": "user", "content": "東京の天気は?"},
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": "c1",
                                    "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "東京"}'},
                                }
                            ],
                        },
                        {"role": "tool", "tool_call_id": "c1", "content": "晴れ"},
                    ],
                }
            ),
            type=ChatCompletionRequest,
        )
        note = fmt.system_text(
            [
                {
                    "name": t["function"]["name"],
                    "description": t["function"].get("description"),
                    "parameters": t["function"]["parameters"],
                }
                for t in tools
            ]
        )
        served = chat_template.render(
            tok.chat_template,
            prompt.conversation(request.messages, tok.chat_template, note),
            dict(bos_token=tok.bos_token or "", eos_token=tok.eos_token or ""),
        )
        ollama = chat_formats.render_go(
            template,
            head
            + [
                {"role": "user", "content": "東京の天気は?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "晴れ", "tool_name": "get_weather"},
            ],
            tools=tools,
        )
        if tok.bos_token and served.startswith(tok.bos_token) and not ollama.startswith(tok.bos_token):
            ollama = tok.bos_token + ollama  # llama.cpp adds the BOS the chat template writes
        assert ollama == re.sub(r',"(call_)?id":"[A-Za-z0-9]{9}"', "", served)
        assert fmt.calls_text([("get_weather", {"city": "東京"})]) in ollama
        assert fmt.result_text("get_weather", "晴れ") in ollama
    # without tools the template renders exactly what it rendered before (the token-for-token proof above)
    assert fmt.system_text([])[:40] not in chat_formats.render_go(template, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("name", list(registry.FAMILIES))
def test_a_familys_template_comes_from_its_family_file(tokenizers, name):
    """The Modelfile's template for a family's own chat template is one its file offers (Family.ollama), by the
    format name the family declares."""
    family = registry.FAMILIES[name]
    tok = _tok(tokenizers[_format_of(family)])
    proof = chat_formats.derive(tok, name)
    facts = registry._ollama.Facts(
        tok.get_vocab(),
        tok.bos_token or "",
        tok.eos_token or "",
        lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
        family.tool_format,
    )
    own = family.ollama(facts)
    assert proof.format == family.ollama_format and proof.template in [t.template for t in own]
    assert set(own[0].stops) <= set(proof.stops)
