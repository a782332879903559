import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from support.conversations import conversation
from train import batches, data

SKY = ("空はなぜ青いのですか。", "光が散らばるからです。", "夕焼けは？", "赤い光が残るからです。")  # two turns


@pytest.fixture(scope="module")
def tok(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


def _jsonl(path: Path, rows) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8"
    )
    return path


def test_chat_loss_covers_exactly_the_assistant_turns(tok):
    msgs = conversation("あなたは親切なアシスタントです。", *SKY)
    [ex] = data.tokenize(tok, "messages", msgs)  # one text holds every turn
    assert len(ex.input_ids) == len(ex.labels)
    learned = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != data.IGNORE])
    assert learned == "光が散らばるからです。<|end|>\n赤い光が残るからです。<|end|>\n<|endoftext|>"
    masked = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == data.IGNORE])
    assert "空はなぜ青いのですか。" in masked and "<|user|>" in masked and "<|assistant|>" in masked
    assert "光が散らばる" not in masked


def test_a_template_that_moves_the_system_prompt_trains_turn_by_turn(tok):
    """Mistral v0.3's template puts the system prompt into the last user turn, so a conversation is not a prefix of
    its continuation: each assistant turn becomes its own example (the conversation up to it), that turn alone
    trained on, with the system prompt where the template puts it when the model is asked for that turn."""
    from aegis.families.mistral import CHAT_TEMPLATE as MISTRAL

    mistral = copy.deepcopy(tok)
    mistral.chat_template = MISTRAL
    msgs = conversation("短く答えてください。", *SKY)
    first, second = data.tokenize(mistral, "messages", msgs)
    for ex, turn, prompt in [(first, "光が散らばるからです。", msgs[:2]), (second, "赤い光が残るからです。", msgs[:4])]:
        learned = mistral.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != data.IGNORE])
        assert learned.strip() == turn + mistral.eos_token
        asked = mistral.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert mistral.decode(ex.input_ids).startswith(asked)  # what the model is given when asked for the turn
    assert "短く答えてください。" in mistral.decode(second.input_ids)  # the system prompt, before the last turn


def test_formats_text_instruction_and_txt(tmp_path, tok):
    src = _jsonl(
        tmp_path / "mix.jsonl", [{"text": "猫が眠る。"}, {"instruction": "翻訳して", "input": "cat", "output": "猫"}]
    )
    txt = tmp_path / "p.txt"
    txt.write_text("一段落目です。\n\n二段落目です。\n", encoding="utf-8")
    ex = data.load([str(src), str(txt)], tok)
    assert len(ex) == 4
    assert all(lab == t for t, lab in zip(ex[0].input_ids, ex[0].labels))  # plain text: every token learned
    instr = tok.decode([t for t, lab in zip(ex[1].input_ids, ex[1].labels) if lab != data.IGNORE])
    assert instr.startswith("猫<|end|>") and "翻訳" not in instr
    assert ex[0].input_ids[-1] == tok.eos_token_id


def test_bad_lines_are_all_reported_with_file_and_line(tmp_path, tok):
    src = _jsonl(
        tmp_path / "bad.jsonl",
        [
            {"text": "良い行"},
            "{not json",
            {"messages": [{"role": "bot", "content": "x"}]},
            {"messages": [{"role": "user", "content": "質問"}]},
            {"foo": 1},
            [1, 2],
        ],
    )
    with pytest.raises(data.DataError) as err:
        data.load([str(src)], tok)
    msg = str(err.value)
    for line, frag in [
        (2, "not valid JSON"),
        (3, "messages[0].role 'bot'"),
        (4, "'messages' has no assistant message"),
        (5, "no 'text', 'messages'"),
        (6, "expected a JSON object"),
    ]:
        assert f"{src}:{line}: {frag}" in msg
    assert "5 bad record(s)" in msg


def test_bad_lines_can_be_skipped_and_counted(tmp_path, tok):
    src = _jsonl(tmp_path / "bad.jsonl", [{"text": "良い行"}, "{oops", {"text": 5}])
    seen = []
    ex = data.load([str(src)], tok, skip_bad=True, log=seen.append)
    assert len(ex) == 1 and "skipped 2 bad record(s)" in seen[0] and "bad.jsonl:2" in seen[0]


def test_a_lone_surrogate_is_a_bad_record_wherever_it_is(tmp_path, tok):
    """JSON's unpaired \\ud800 escape decodes to a string no tokenizer takes: a bad record naming its field."""
    src = _jsonl(
        tmp_path / "bad.jsonl",
        [
            {"text": "良い行"},
            '{"text": "a\\ud800b"}',
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udfff"}]}',
            '{"instruction": "x\\ud83d", "output": "y"}',
        ],
    )
    with pytest.raises(data.DataError) as err:
        data.load([str(src)], tok)
    for line, field in [(2, "text"), (3, "messages[1].content"), (4, "instruction")]:
        assert f"{src}:{line}: {field} holds a lone surrogate" in str(err.value)
    seen = []
    assert len(data.load([str(src)], tok, skip_bad=True, log=seen.append)) == 1
    assert "skipped 3 bad record(s)" in seen[0]
    pair = _jsonl(tmp_path / "pair.jsonl", ['{"text": "\\ud83d\\ude00"}'])  # a surrogate pair is one character
    assert len(data.load([str(pair)], tok)) == 1


def test_missing_and_unsupported_sources(tmp_path, tok):
    with pytest.raises(data.DataError, match="nope.jsonl: no such file"):
        data.load([str(tmp_path / "nope.jsonl")], tok)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(data.DataError, match="unsupported file type '.csv'"):
        data.load([str(tmp_path / "x.csv")], tok)
    with pytest.raises(data.DataError, match="embedded:nothing.txt"):
        data.resolve("embedded:nothing.txt")


def test_packing_fills_windows_without_padding(tok):
    ex = data.load(["embedded:prose_eval.txt"], tok)
    total = sum(len(e.input_ids) for e in ex)
    packed = batches.pack(ex, 128)
    assert all(len(p.input_ids) == 128 for p in packed[:-1])
    assert sum(len(p.input_ids) for p in packed) == total
    assert [t for p in packed for t in p.input_ids] == [t for e in ex for t in e.input_ids]


def test_stream_is_deterministic_and_independent_of_process_count(tok):
    ex = data.load(["embedded:prose_eval.txt"], tok)
    one = batches.Stream(ex, 64, seed=3)
    two = [batches.Stream(ex, 64, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        a = one.next_update(1, 2)  # one process, accumulation 2
        b = [s.next_update(1, 1)[0] for s in two]  # two processes, no accumulation: one micro-batch each
        assert [x.input_ids for m in a for x in m] == [x.input_ids for m in b for x in m]
    again = batches.Stream(ex, 64, seed=3)
    again.restore(one.state())
    assert again.next_update(1, 1)[0][0].input_ids == one.next_update(1, 1)[0][0].input_ids


def test_hub_dataset_from_a_snapshot_shaped_cache(tmp_path, tok, monkeypatch):
    """The real huggingface-hub code path, offline, on a local cache laid out like a hub snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--TFMC--imatrix-dataset-for-japanese-llm"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(data.resolve("embedded:prose_eval.txt")[0], snap / "imatrix.txt")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    files = data.resolve("hf:TFMC/imatrix-dataset-for-japanese-llm")
    assert [f.name for f in files] == ["imatrix.txt"] and os.path.realpath(files[0]).startswith(str(tmp_path))
    assert len(data.load(["hf:TFMC/imatrix-dataset-for-japanese-llm"], tok)) > 10


def test_documents_packing_cuts_the_same_windows_and_numbers_their_documents():
    """data.packing = "documents" keeps concat's windows and targets, adds each token's document, and drops only
    the target of each document's first token (nothing of its own document comes before it)."""
    ex = [
        data.Example([1, 2, 3], [1, 2, 3]),
        data.Example([4, 5], [data.IGNORE, 5], chat=True),
        data.Example([6, 7, 8, 9, 10, 11], [6, 7, 8, 9, 10, 11]),
    ]
    concat, docs = batches.pack(ex, 4), batches.pack(ex, 4, documents=True)
    assert [w.input_ids for w in docs] == [w.input_ids for w in concat] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert all(w.documents is None for w in concat)
    assert [w.documents for w in docs] == [[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0]]
    assert [w.labels for w in docs] == [[1, 2, 3, data.IGNORE], [5, data.IGNORE, 7, 8], [9, 10, 11]]
    assert [w.labels for w in concat] == [[1, 2, 3, data.IGNORE], [5, 6, 7, 8], [9, 10, 11]]
    batch = batches.collate(docs[1:], pad_id=0, width=5)
    assert batch["documents"].tolist() == [[0, 1, 1, 1, 2], [0, 0, 0, 1, 1]]  # padding: a document of its own
    assert "documents" not in batches.collate(concat[1:], pad_id=0, width=5)


def test_auto_packing_keeps_chat_documents_apart_and_reads_text_on(tmp_path, tok):
    chat = _jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "空は？"}, {"role": "assistant", "content": "青い。"}]}],
    )
    txt = tmp_path / "p.txt"
    txt.write_text("一段落目です。\n\n二段落目です。\n", encoding="utf-8")
    text, mixed = data.load([str(txt)], tok), data.load([str(txt), str(chat)], tok)
    assert batches.packing_mode("auto", text) == "concat" and batches.packing_mode("auto", mixed) == "documents"
    assert batches.packing_mode("concat", mixed) == "concat" and batches.packing_mode("documents", text) == "documents"
    assert batches.packing_mode("auto", mixed, tiled_attention=True) == "concat"  # one long sequence per window
    with pytest.raises(data.DataError, match=r'^data.packing = "documents" .*train.tiled_attention'):
        batches.packing_mode("documents", mixed, tiled_attention=True)
    stream = batches.Stream(mixed * 8, 16, seed=0, documents=True)
    assert all(w.documents is not None and len(w.documents) == len(w.input_ids) for w in stream.next_update(2, 2)[0])
