"""Training data: read sources, tokenize (chat loss only on assistant tokens); train/batches.py packs the examples
into windows and batches them by rank.

Sources (`data.train` / `data.eval` entries):
    embedded:NAME          a file of the corpus that ships with AEGIS (aegis/corpus/NAME)
    hf:OWNER/NAME          a hub dataset repo, fetched with huggingface-hub (its .txt/.jsonl/.json files)
    PATH                   a local .txt, .jsonl or .json file, or a directory of them
Formats: .txt (paragraphs split at blank lines), JSONL with {"text"}, {"messages": [...]} or
{"instruction", "input", "output"}; .json holding a list of such objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aegis.errors import AegisError
from aegis.tiny import corpus_path

from .turns import assistant_spans

IGNORE = -100
ROLES = ("system", "user", "assistant")
SUFFIXES = (".txt", ".jsonl", ".json")


class DataError(AegisError):
    pass


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    chat: bool = False  # from a chat or instruction record
    documents: list[int] | None = None  # a packed window's document of each token, where they are kept apart


def resolve(source: str) -> list[Path]:
    """The local files behind one `data.*` entry."""
    if source.startswith("embedded:"):
        path = corpus_path(source.removeprefix("embedded:"))
        if not path.is_file():
            raise DataError(f"{source}: no such file in the embedded corpus")
        return [path]
    if source.startswith("hf:"):
        from huggingface_hub import snapshot_download

        repo, _, revision = source.removeprefix("hf:").partition("@")
        root = Path(
            snapshot_download(
                repo_id=repo, repo_type="dataset", revision=revision or None, allow_patterns=[f"*{s}" for s in SUFFIXES]
            )
        )
        files = sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{source}: the dataset has no {'/'.join(SUFFIXES)} files")
        return files
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{source}: the directory has no {'/'.join(SUFFIXES)} files")
        return files
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{source}: unsupported file type {path.suffix!r} (use {', '.join(SUFFIXES)})")
    return [path]


def _check_record(obj) -> tuple[str, object]:
    """('text'|'messages', payload) for a valid record; raises ValueError naming the bad field."""
    _check_unicode(obj, "")
    return _record(obj)


def _check_unicode(value, where: str) -> None:
    """JSON's \\ud800-\\udfff escapes decode to lone surrogates: not text, and no tokenizer takes them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{where or 'the record'} holds a lone surrogate {value[e.start]!r} at character "
                f"{e.start} (an unpaired \\u escape: not valid Unicode)"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{where}[{i}]")


def _record(obj) -> tuple[str, object]:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] must be an object")
            if m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}].role {m.get('role')!r} is not one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("'messages' has no assistant message to learn from")
        return "messages", msgs
    if "instruction" in obj or "output" in obj:
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise ValueError(f"'{key}' must be a non-empty string")
        if not isinstance(obj.get("input", ""), str):
            raise ValueError("'input' must be a string")
        user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
        return "messages", [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise ValueError("'text' must be a non-empty string")
        return "text", obj["text"]
    raise ValueError(f"no 'text', 'messages' or 'instruction'/'output' field (keys: {', '.join(obj) or 'none'})")


def read_text(path: Path) -> str:
    """A data file's text; one that is not UTF-8 (a binary file, another encoding) is a DataError naming it."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"a binary file or another encoding?"
        ) from None


def records(path: Path, skip_bad: bool = False, skipped: list[str] | None = None) -> Iterator[tuple[str, object]]:
    """Yield (kind, payload) from one file. Every bad line is reported at once as `file:line: problem`,
    unless skip_bad, when they are skipped and listed in `skipped`."""
    if path.suffix == ".txt":
        for para in read_text(path).split("\n\n"):
            if para.strip():
                yield "text", para.strip()
        return
    if path.suffix == ".json":
        try:
            items = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise DataError(f"{path}:1: expected a JSON list of records")
        lines = [(i + 1, item) for i, item in enumerate(items)]  # record numbers stand in for lines
    else:
        lines = []
        for no, raw in enumerate(read_text(path).splitlines(), 1):
            if raw.strip():
                try:
                    lines.append((no, json.loads(raw)))
                except json.JSONDecodeError as e:
                    lines.append((no, ValueError(f"not valid JSON ({e.msg} at column {e.colno})")))
    good, bad = [], []
    for no, obj in lines:
        try:
            if isinstance(obj, ValueError):
                raise obj
            good.append(_check_record(obj))
        except ValueError as e:
            bad.append(f"{path}:{no}: {e}")
    if len(bad) == 1 and not skip_bad:
        raise DataError(f"{bad[0]} (set data.skip_bad_lines = true to skip bad records)")
    if bad and not skip_bad:
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(
            f"{len(bad)} bad record(s) (set data.skip_bad_lines = true to skip them):\n  "
            + "\n  ".join(bad[:20])
            + more
        )
    if skipped is not None:
        skipped += bad
    yield from good


def tokenize(tokenizer, kind: str, payload) -> list[Example]:
    """A text record is one example; a chat is one, or one per assistant turn where the template needs it."""
    if kind == "text":
        ids = tokenizer(payload, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return [Example(ids, list(ids))]
    texts = assistant_spans(tokenizer, payload)
    if texts is None:
        raise DataError(
            "the chat template renders an assistant turn that does not continue the prompt before it, "
            "so its tokens cannot be told apart"
        )
    out = []
    for text, spans in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [
            tid if any(s < e_ and e > s_ for s_, e_ in spans) else IGNORE
            for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        out.append(Example(enc["input_ids"], labels, chat=True))
    return out


def load(sources: list[str], tokenizer, skip_bad: bool = False, log=print) -> list[Example]:
    """Read and tokenize every source; all validation happens here, before training starts."""
    examples: list[Example] = []
    skipped: list[str] = []
    for source in sources:
        for path in resolve(source):
            examples += [ex for k, p in records(path, skip_bad, skipped) for ex in tokenize(tokenizer, k, p)]
    if skipped:
        log(f"skipped {len(skipped)} bad record(s); first: {skipped[0]}")
    if not examples:
        raise DataError(f"{', '.join(sources)}: no usable examples")
    return examples
