"""Every registered model family (aegis/families/: Phi-3, Llama, Mistral, Qwen2) end to end on a small model of that
family built here (tests/support/families.py): `python -m train` → `python -m export all` with every GGUF type (merge,
GGUF, parity, and the Modelfile whose template is proved against the family's chat template) → `python -m serve`
answering through the API exactly as the merged model does, and calling tools in the family's tool format. Tied
embeddings (Llama, Qwen2) and q/k/v biases (Qwen2) included. An architecture AEGIS does not support is refused by
`train` before any weights. Without a model: each family's chat and tool format render and read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest

from aegis import chat_template, families as registry, tool_format
from conftest import SHORT, train_cli
from export import names
from support import families
from support.modelfile_text import parse

ROOT = Path(__file__).resolve().parents[1]
TYPES = list(names.TYPES)
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "日本の首都はどこですか？"}]


@pytest.fixture(scope="module", params=list(registry.FAMILIES))
def exported(request, tiny_path, tmp_path_factory) -> dict:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = families.build_model(family, root / f"tiny-{family}", tiny_path)
    run = root / "run"
    train_cli(run, *SHORT, f"model.base={base}", *families.TRAIN_OVERRIDES.get(family, []))
    out = run / "export"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "all",
            "--run",
            str(run),
            "--type",
            ",".join(TYPES),
            "--name",
            family,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"export failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return {
        "family": family,
        "base": base,
        "run": run,
        "out": out,
        "stdout": proc.stdout,
        "parity": json.loads((out / "parity.json").read_text()),
        "summary": json.loads((out / "export.json").read_text()),
    }


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
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    want = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    gguf = exported["out"] / f"{exported['family']}-f32.gguf"
    with Server("--model", f"fam={gguf}", "--parallel", "1", "--threads", "1", log_path=tmp_path / "serve.log") as s:
        r = httpx.post(
            s.api + "/chat/completions",
            timeout=120,
            json={"model": "fam", "messages": CHAT, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
        )
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
    (base / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]})
    )
    proc = train_cli(tmp_path / "run2", *SHORT, f"model.base={base}", check=False)
    assert proc.returncode == 2 and "LlamaForSequenceClassification" in proc.stderr


def test_train_export_and_serve_read_the_registry():
    """Every stage's view of the families is the registry's: a family file is all a family needs (and its test
    data, here)."""
    from aegis.loading import AUTO_TARGETS
    from export import vocab
    from serve.backends import base

    assert set(AUTO_TARGETS) == set(names.FAMILIES) == set(families.FAMILIES) == set(registry.FAMILIES)
    for name, family in registry.FAMILIES.items():
        assert tuple(AUTO_TARGETS[name]) == family.lora_targets
        assert names.arch_name(name) == family.gguf_arch and registry.get(name) is family
        assert family in registry.by_arch(family.gguf_arch)
        assert set(family.end_of_turn) <= set(base.END_OF_TURN)
        assert not family.end_of_turn or family.end_of_turn[0] in vocab.EOT_TOKENS
        assert family.bpe_pre is None or vocab.BPE_PRE[name] == family.bpe_pre
    assert registry.FAMILIES["qwen2"].lora_targets[-3:] == ("gate_proj", "up_proj", "down_proj")


def test_a_new_family_file_reaches_every_stage(tmp_path):
    """What a family file does is all a family needs: registered before the stages load (as a module of
    aegis/families/ is), a new family is accepted by train, written by export and stopped and parsed by serve."""
    code = f"""
import json, pathlib
from aegis.families import Family, register, qwen2
register(Family(name="qwen3", gguf_arch="qwen3", lora_targets=("q_proj", "v_proj"),
                chat_template=qwen2.CHAT_TEMPLATE, chat_markers=("<|im_start|>", "<|im_end|>"),
                end_of_turn=("<|im_end|>", "<|qwen3_end|>"), ollama_format="ChatML", tools="hermes", bpe_pre="qwen2"))
from aegis.loading import AUTO_TARGETS, check_architecture
from export import names, vocab
from serve.backends import base
config = pathlib.Path({str(tmp_path / "config.json")!r})
config.write_text(json.dumps({{"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}}))
check_architecture(config)
print(AUTO_TARGETS["qwen3"], names.arch_name("qwen3"), vocab.BPE_PRE["qwen3"], "<|qwen3_end|>" in base.END_OF_TURN)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["['q_proj',", "'v_proj']", "qwen3", "qwen2", "True"]


# ---- without a model: each family's chat and tool format --------------------------------------------------------

# bounded values, so that a small random model's calls end within max_tokens
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["東京", "大阪"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "都市の天気予報", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {"name": "ping", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
    },
]
CALLS = [("get_weather", {"city": '東京 "}{<tool_call>', "days": 2}), ("ping", {})]


def _described() -> list[dict]:
    return [
        {
            "name": t["function"]["name"],
            "description": t["function"].get("description"),
            "parameters": t["function"]["parameters"],
        }
        for t in TOOLS
    ]


@pytest.mark.parametrize("name", list(registry.FAMILIES))
def test_chat_template_is_its_familys_and_renders(name):
    family = registry.FAMILIES[name]
    assert registry.by_chat_template(family.chat_template) is family  # how a served model finds its tool format
    text = chat_template.render(
        family.chat_template,
        CHAT + [{"role": "assistant", "content": "東京です。"}],
        {"bos_token": "<s>", "eos_token": "</s>"},
        add_generation_prompt=False,
    )
    assert all(m in text for m in family.chat_markers) and "東京です。" in text
    assert not family.end_of_turn or family.end_of_turn[0] in text  # the format's own end of a turn


@pytest.mark.parametrize("name", list(registry.FAMILIES))
def test_tool_turns_render_and_read_back(name):
    """A conversation with calls and a tool result renders through the family's chat template in its tool format;
    the reply reader gives back the same calls from the text, whole, a character at a time and in odd pieces."""
    import msgspec

    from serve import prompt
    from serve.schemas import ChatCompletionRequest

    family = registry.FAMILIES[name]
    fmt = family.tool_format
    written = [
        {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in enumerate(CALLS)
    ]
    req = msgspec.json.decode(
        msgspec.json.encode(
            {
                "model": "m",
                "tools": TOOLS,
                "messages": [
                    CHAT[1],
                    {"role": "assistant", "content": None, "tool_calls": written},
                    {"role": "tool", "tool_call_id": "c0", "content": "晴れ"},
                ],
            }
        ),
        type=ChatCompletionRequest,
    )
    note = fmt.system_text(_described())
    messages = prompt.conversation(req.messages, family.chat_template, note)
    text = chat_template.render(family.chat_template, messages, {"bos_token": "<s>", "eos_token": "</s>"})
    ids = [w["id"] for w in written]
    for part in (note, fmt.calls_text(CALLS, ids), fmt.result_text("get_weather", "晴れ", "c0")):
        assert part in text
    if name == "mistral":  # Mistral's call ids: 9 letters and digits, the same in the call and in its result
        short = tool_format.mistral_id("c0")
        assert f'"id":"{short}"' in text and f'"call_id":"{short}"' in text and len(short) == 9
    reply = fmt.calls_text(CALLS)
    assert reply.startswith(fmt.opening)
    for size, opening in [(len(reply), ""), (1, ""), (7, ""), *[(5, also) for also in fmt.also]]:
        reader, events, written_reply = fmt.reader(), [], opening + reply  # Llama's <|python_tag|> before a call
        for i in range(0, len(written_reply), size):
            events += reader.feed(written_reply[i : i + size])
        assert reader.mode == "calls"
        assert [(c.name, json.loads(c.arguments)) for c in reader.calls] == CALLS
        assert [e[2].name for e in events if e[0] == "call"] == [n for n, _ in CALLS]
        for i, call in enumerate(reader.calls):
            assert "".join(e[2] for e in events if e[0] == "arguments" and e[1] == i) == call.arguments
    prose = fmt.reader()
    assert prose.feed("晴れ" + fmt.opening) == [("content", "晴れ" + fmt.opening)] and prose.mode == "content"


# ---- served: tool calls in the family's format ------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    from support.serving import Server, openai_client

    gguf = exported["out"] / f"{exported['family']}-f32.gguf"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with Server("--model", f"fam={gguf}", "--parallel", "1", "--threads", "1", log_path=log) as s:
        yield openai_client(s)


def _ask(client, **kwargs):
    args = (
        dict(
            model="fam",
            messages=CHAT,
            tools=TOOLS,
            temperature=1.0,
            max_tokens=240,
            seed=3,
            tool_choice="required",
            parallel_tool_calls=False,
        )
        | kwargs
    )
    return client.chat.completions.create(**args)


def test_served_model_calls_tools_in_its_familys_format(served, exported):
    """Decoding is held to the family's tool format: the model writes its calls in that format (its tokens, read
    back through logprobs), and every call parses and validates, whole and streamed alike."""
    fmt = registry.FAMILIES[exported["family"]].tool_format
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):
        whole = _ask(served, seed=seed, logprobs=True).choices[0]
        assert whole.finish_reason == "tool_calls" and whole.message.content is None, whole.message.content
        (call,) = whole.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
        written = b"".join(bytes(t.bytes) for t in whole.logprobs.content).decode()
        reader = fmt.reader()
        reader.feed(written)
        assert written.startswith(fmt.opening) and reader.mode == "calls", written
        assert [(c.name, c.arguments) for c in reader.calls] == [(call.function.name, call.function.arguments)]
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = _ask(served, tool_choice=named).choices[0].message.tool_calls[0]
    chunks = list(_ask(served, tool_choice=named, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == whole.function.name == "get_weather"
    assert "".join(d.function.arguments for d in deltas) == whole.function.arguments


def test_a_served_call_cut_short_is_text_with_finish_reason_length(served):
    """max_tokens ends the reply inside the call (halfway, or one token before its end, when its arguments already
    parse): never tool_calls; the partial text is content (non-streamed) and finish_reason is length either way."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = _ask(served, tool_choice=named, logprobs=True).choices[0]
    assert whole.finish_reason == "tool_calls"
    written = b"".join(bytes(t.bytes) for t in whole.logprobs.content).decode()
    n = len(whole.logprobs.content)
    for cut in (n // 2, n - 1):
        r = _ask(served, tool_choice=named, max_tokens=cut).choices[0]  # the same seed: a prefix of `written`
        assert r.finish_reason == "length" and r.message.tool_calls is None, (cut, r.message)
        assert r.message.content and written.startswith(r.message.content), (written, r.message.content)
        chunks = list(_ask(served, tool_choice=named, max_tokens=cut, stream=True))
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
