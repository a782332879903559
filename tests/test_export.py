"""Export end to end on the embedded tiny Phi-3, from a real short training run: `python -m export all` run as a user
would, then every output checked with the tools a user runs (plain transformers, llama-cpp-python, gguf's reader)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aegis import digest
from support.conversations import CONVERSATIONS

ROOT = Path(__file__).resolve().parents[1]
TYPES = ["f16", "q8_0", "q4_k_m"]
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def export_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"export failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def export_all(run: Path, out: Path, *more: str) -> subprocess.CompletedProcess:
    """`python -m export all` of RUN into OUT: the test's GGUF types, named tiny-soul."""
    args = ("--run", str(run), "--out", str(out), "--type", ",".join(TYPES), "--name", "tiny-soul", *more)
    return export_cli("all", *args, "--no-progress")


@pytest.fixture(scope="session")
def exported(short_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("export") / "out"
    proc = export_all(short_run, out, "--system", "あなたは親切なアシスタントです。")
    return {
        "run": short_run,
        "out": out,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "merged": out / "merged",
        "gguf": {t: out / f"tiny-soul-{t}.gguf" for t in TYPES},
        "modelfile": out / "tiny-soul.modelfile",
        "parity": json.loads((out / "parity.json").read_text()),
    }


def test_all_prints_where_everything_is(exported):
    out = exported["stdout"]
    for t, p in exported["gguf"].items():
        assert p.is_file(), t
        assert str(p) in out
    assert str(exported["modelfile"]) in out and str(exported["merged"]) in out
    assert not list(exported["out"].glob(".tmp-*")), "temporary files left behind"
    # parity's figures in words, each with whether it is fine and why
    assert re.search(
        r"top-1 agreement: .* at [\d.]+% of \d+ positions, .*; fine, the limit for q8_0 is 97% counting "
        r"near-ties",
        out,
    ), out
    assert "mean KL(HF‖GGUF): " in out and "fine, the limit for f16 is 0.001" in out
    assert "short prompts ran in 512 positions, what `python -m serve` opens this file with by default" in out
    # a vocab-only load (the Modelfile's tokenizer) reads no hyperparameters; llama.cpp's warning about them is dropped
    assert "n_ctx_train (0)" not in exported["stderr"] + out


def test_merged_model_loads_in_plain_transformers_and_matches_checkpoint(exported):
    import torch

    from aegis.loading import load_checkpoint

    merged = exported["merged"]
    ids = [[5, 120, 33, 900, 17, 250, 8, 64], [300, 301, 302, 11, 12]]
    # A fresh interpreter that imports only transformers: the merged model needs no AEGIS code.
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r}, dtype=torch.float32)\n"
        f"out = [m(input_ids=torch.tensor([i])).logits[0].tolist() for i in {ids!r}]\n"
        "assert not [n for n in sys.modules if n.split('.')[0] in ('aegis', 'train', 'export', 'serve')]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged_logits = [torch.tensor(x) for x in json.loads(proc.stdout.strip().splitlines()[-1])]

    ckpt = exported["run"] / "final"
    model, soul, _, _ = load_checkpoint(ckpt, quantization="none", dtype="float32", device=torch.device("cpu"))
    with torch.no_grad():
        for i, got in zip(ids, merged_logits):
            ref = model(input_ids=torch.tensor([i])).logits[0]
            assert float((ref - got).abs().max()) <= 1e-4 * float(ref.abs().max())

    report = json.loads((merged / "aegis_export.json").read_text())
    assert report["check"]["relative"] <= 1e-4 and report["check"]["top1_agreement"] == 1.0
    # The run trained on a 4-bit base: its gap to the full-precision merge is reported apart, not as an error.
    assert report["quantization"] == "nf4" and report["quantization_gap"]["max_abs"] > 0
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and not cfg.get("tie_word_embeddings")
    assert (merged / "tokenizer.model").is_file() and (merged / "chat_template.jinja").is_file()
    # The soul really is in the head: lm_head differs from the base's, by exactly the fold.
    from safetensors.torch import load_file

    from aegis.loading import resolve_base

    base_head = load_file(str(resolve_base("embedded") / "model.safetensors"))["lm_head.weight"]
    head = load_file(str(merged / "model.safetensors"))["lm_head.weight"]
    assert not torch.equal(head, base_head)


def test_gguf_f16_q8_0_pass_parity_and_speak_japanese(exported):
    import llama_cpp

    from export import prompts

    for t in ("f16", "q8_0"):
        entry = exported["parity"][exported["gguf"][t].name]
        assert entry["passed"], entry["failures"]
        assert entry["template"]["ok"]
        assert entry["longrope"] and entry["prompts"]["long"]["n_ctx"] > 512 >= entry["prompts"]["short0"]["n_ctx"]
        assert entry["overall"]["top1_tie"] >= 0.99
        # the greedy replies the server must give (tests/test_served_parity.py), decoded in its default context
        assert entry["served_context"] == 512 and set(entry["replies"]) == {
            "prose",
            "short0",
            "short1",
            "short2",
            "short3",
            "chat",
        }
        assert all(len(r["ids"]) == 32 and r["prompt"] for r in entry["replies"].values())
        assert entry["sample"]["prose"] == entry["replies"]["prose"]["text"]
    assert exported["parity"][exported["gguf"]["f16"].name]["overall"]["kl_mean"] < 1e-3

    # Generation through llama-cpp-python's own API, from a Japanese prompt it tokenizes itself.
    for t in ("f16", "q8_0"):
        llm = llama_cpp.Llama(model_path=str(exported["gguf"][t]), n_ctx=512, verbose=False)
        out = llm.create_completion(prompts.SHORT[1][:8], max_tokens=24, temperature=0.0)
        text = out["choices"][0]["text"]
        assert JAPANESE.search(text), (t, text)
        assert JAPANESE.search(exported["parity"][exported["gguf"][t].name]["sample"]["prose"])


def test_q4_k_m_made_by_llama_cpp_quantizer(exported, tiny_path):
    import gguf

    path = exported["gguf"]["q4_k_m"]
    reader = gguf.GGUFReader(str(path))
    assert int(reader.fields["general.file_type"].parts[-1][0]) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    entry = exported["parity"][path.name]
    assert entry["made_by"] == "llama.cpp quantizer" and entry["passed"]
    # k-quants take rows in blocks of 256: where a row length is not a multiple of it llama.cpp falls back for those
    # tensors, and that is reported; the embedded model's rows (256, 768) all fit, so it needs none.
    config = json.loads((tiny_path / "config.json").read_text())
    rows = {config["hidden_size"], config["intermediate_size"]}
    assert bool(entry["fallbacks"]) == any(r % 256 for r in rows), entry["fallbacks"]
    assert "Q4_K" in entry["tensor_types"]


def _field(reader, key):
    f = reader.fields[key]
    if len(f.types) == 1 and f.types[0] == __import__("gguf").GGUFValueType.STRING:
        return bytes(f.parts[-1]).decode()
    if len(f.data) == 1:
        return f.parts[f.data[0]][0].item()
    return [f.parts[i] for i in f.data]


def test_gguf_reads_back_with_gguf_reader(exported, tiny_path):
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(exported["gguf"]["f16"]))
    cfg = json.loads((exported["merged"] / "config.json").read_text())
    K, T = gguf.Keys, gguf.TokenType
    k = lambda key: key.format(arch="phi3")  # noqa: E731
    assert _field(reader, K.General.ARCHITECTURE) == "phi3"
    assert _field(reader, k(K.LLM.CONTEXT_LENGTH)) == 2048
    assert _field(reader, k(K.Rope.SCALING_ORIG_CTX_LEN)) == 512
    assert _field(reader, k(K.LLM.EMBEDDING_LENGTH)) == cfg["hidden_size"]
    assert _field(reader, k(K.LLM.FEED_FORWARD_LENGTH)) == cfg["intermediate_size"]
    assert _field(reader, k(K.LLM.BLOCK_COUNT)) == cfg["num_hidden_layers"]
    assert _field(reader, k(K.Attention.HEAD_COUNT)) == cfg["num_attention_heads"]
    assert _field(reader, k(K.Attention.HEAD_COUNT_KV)) == cfg["num_key_value_heads"]
    assert _field(reader, k(K.Rope.DIMENSION_COUNT)) == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert _field(reader, k(K.Rope.FREQ_BASE)) == pytest.approx(10000.0)
    assert _field(reader, k(K.Attention.LAYERNORM_RMS_EPS)) == pytest.approx(1e-5)
    assert _field(reader, k(K.Attention.SLIDING_WINDOW)) == 0
    assert _field(reader, k(K.Rope.SCALING_ATTN_FACTOR)) == pytest.approx(
        math.sqrt(1 + math.log(4) / math.log(512)), 1e-6
    )

    tok = AutoTokenizer.from_pretrained(exported["merged"])
    assert _field(reader, K.Tokenizer.MODEL) == "llama"
    tokens = [bytes(p).decode() for p in _field(reader, K.Tokenizer.LIST)]
    types = [int(p[0]) for p in _field(reader, K.Tokenizer.TOKEN_TYPE)]
    assert len(tokens) == cfg["vocab_size"] == 4032 and len(tok) < 4032  # padded like Phi-3's 32064
    for t in ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"):
        i = tok.convert_tokens_to_ids(t)
        assert tokens[i] == t and types[i] == T.CONTROL
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[0] == T.UNKNOWN
    assert types[-1] == T.UNUSED and tokens[-1].startswith("[PAD")
    assert _field(reader, K.Tokenizer.BOS_ID) == tok.bos_token_id
    assert _field(reader, K.Tokenizer.EOS_ID) == tok.eos_token_id
    assert _field(reader, K.Tokenizer.EOT_ID) == tok.convert_tokens_to_ids("<|end|>")
    assert _field(reader, K.Tokenizer.UNK_ID) == tok.unk_token_id
    assert _field(reader, K.Tokenizer.PAD_ID) == tok.pad_token_id
    assert _field(reader, K.Tokenizer.ADD_BOS) is False  # explicit, not llama.cpp's SentencePiece default
    assert _field(reader, K.Tokenizer.ADD_PREFIX) is False
    assert _field(reader, K.Tokenizer.CHAT_TEMPLATE) == tok.chat_template
    name = _field(reader, "general.name")
    assert "phi3" not in name.lower() and "phi-3" not in name.lower()  # this tokenizer keeps whitespace after specials

    tensors = {t.name: t for t in reader.tensors}
    assert tensors["rope_factors_long.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(tensors["rope_factors_short.weight"].shape) == [16]
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [h, 3 * h]  # fused, GGUF order (cols, rows)
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [h, 2 * i]  # gate and up, fused
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert not [n for n in tensors if re.search(r"attn_[qkv]\.|ffn_gate", n)]
    for n, t in tensors.items():
        if "norm" in n or len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, n
    layers = range(cfg["num_hidden_layers"])
    expected = {
        "token_embd.weight",
        "output_norm.weight",
        "output.weight",
        "rope_factors_long.weight",
        "rope_factors_short.weight",
    } | {
        f"blk.{b}.{n}.weight"
        for b in layers
        for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
    }
    assert set(tensors) == expected


def test_modelfile_template_renders_like_the_chat_template(exported):
    from transformers import AutoTokenizer

    from export import chat_formats
    from support.modelfile_text import parse

    assert "template    chat template: Phi-3; the Modelfile template renders" in exported["stdout"]
    proof = json.loads((exported["out"] / "export.json").read_text())["template"]
    assert proof["ok"] and proof["format"] == "Phi-3" and len(proof["conversations"]) >= 6
    text = exported["modelfile"].read_text()
    cmds = parse(text)
    (from_path,) = [a for c, a in cmds if c == "FROM"]
    assert (exported["modelfile"].parent / from_path).resolve().is_file()
    (template,) = [a for c, a in cmds if c == "TEMPLATE"]
    stops = {a.split(" ", 1)[1].strip('"') for c, a in cmds if c == "PARAMETER" and a.startswith("stop ")}
    assert {"<|end|>", "<|user|>", "<|assistant|>", "<|system|>"} <= stops
    assert ("PARAMETER", "num_ctx 512") in cmds
    assert ("SYSTEM", "あなたは親切なアシスタントです。") in cmds
    tok = AutoTokenizer.from_pretrained(exported["merged"])
    for chat in CONVERSATIONS:
        go = chat_formats.render_go(template, chat)
        assert go == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_rerun_is_idempotent(exported):
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in exported["gguf"].values()}
    merged_mtime = (exported["merged"] / "model.safetensors").stat().st_mtime_ns
    proc = export_all(exported["run"], exported["out"])
    assert "reusing" in proc.stdout
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in exported["gguf"].values()}
    assert after == before and (exported["merged"] / "model.safetensors").stat().st_mtime_ns == merged_mtime
    assert not list(exported["out"].glob(".tmp-*"))
    assert json.loads((exported["out"] / "parity.json").read_text()).keys() == exported["parity"].keys()


def test_rerun_remakes_a_gguf_whose_record_is_gone_or_wrong(exported):
    """A GGUF is reused only while it is the file that passed: serve refuses one without a matching .sha256."""
    path = next(iter(exported["gguf"].values()))
    before = path.stat().st_mtime_ns
    digest.sidecar(path).unlink()
    proc = export_all(exported["run"], exported["out"])
    assert f"{path} already passed" not in proc.stdout
    assert path.stat().st_mtime_ns != before
    digest.verify(path)


def test_gguf_command_writes_parity_json_beside_the_file(exported, tmp_path):
    out = tmp_path / "m.gguf"
    proc = export_cli("gguf", "--model", str(exported["merged"]), "--out", str(out), "--type", "f32", "--no-progress")
    assert out.is_file() and "PASS" in proc.stdout and "top-1" in proc.stdout
    entry = json.loads((tmp_path / "parity.json").read_text())["m.gguf"]
    assert entry["passed"] and entry["overall"]["max_abs"] < 5e-3 and entry["overall"]["top1"] == 1.0
    # per layer: attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down; then token_embd, output_norm, output
    # and the two LongRoPE factor tensors
    layers = json.loads((exported["merged"] / "config.json").read_text())["num_hidden_layers"]
    assert entry["tensor_types"] == {"F32": 6 * layers + 5}
