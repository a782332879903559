"""A tiny Phi-3 that copies its input, as an instruct model does when it rewrites a text or edits a code file: the
stand-in bench/speculate_bench.py serves, so that prompt lookup has something to find offline.

    python bench/copy_model.py [--cache DIR] [--steps N]     prints the path of the q8_0 GGUF (made once, cached)
    python bench/copy_model.py --steps N --save DIR          on a GPU machine: train only, the model (bf16) in DIR
    python bench/copy_model.py --model-dir DIR               export what --save wrote, into the cache

On two CPU cores the model learns to predict the held-out replies token by token but drifts from them when it
decodes greedily on its own; a GPU trains many more steps in a minute (--steps), and the folder --save writes
(about 14 MB) comes back to be exported here, where the export's packages are.

The embedded tiny model (aegis/tiny.py) is fine-tuned, all of its weights, in a plain torch loop on chat records
made only from text shipped in this repository: a user turn that asks to rewrite a passage of the training prose
(aegis/corpus/prose_train_*.txt) and an assistant turn that repeats it; a user turn that asks to rename an identifier
in a piece of the repository's own code (aegis/**/*.py, tools/*.py) and an assistant turn that writes that code again
with the name changed; and, so that it still chats, some of the corpus's own chats. The passages the bench uses
(aegis/corpus/prose_eval.txt and aegis/schedule.py) are never trained on; the log scores the reply tokens of the
bench's two grounded prompts (teacher-forced top-1 agreement). Then `python -m export gguf --type q8_0` writes the
GGUF (7.4 MiB), cached under --cache by a fingerprint of this script, the tiny model and the texts it learns from.
On the 2-core development machine the 560 steps take about 21 minutes; the held-out reply tokens the model then
predicts (teacher-forced): 44 % of the rewrite's, 83 % of the code edit's (10 % and 7 % before).

Why the attention is guided: trained on these records by the next-token loss alone, the model had not begun to copy
after 200-500 steps (an induction circuit forms abruptly, after more steps than two cores give in minutes; even a
fresh two-layer model on repeated random tokens had not after 400). So for the first GUIDED share of the steps the
loss also tells one head to attend to the previous token and a head after it, at each reply token, to the prompt's
token prompt lookup would draft there (copy_sources): the circuit an induction head is, given instead of found. The
passages start short (START characters at most) and grow to the bench's length, the rest of the steps unguided.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aegis import tiny  # noqa: E402
from bench.speculate_bench import grounded_tasks  # noqa: E402

STEPS, LR, WARMUP, SEED = 560, 1e-3, 20, 0  # STEPS: the default of --steps
MAX_TOKENS = 1700  # a record's tokens at most: the bench's code prompt (~1 200) and a few hundred of its reply
SHORTEST, START, LONGEST = 20, 200, 1400  # a passage's characters: fewest; most at first; most at last (the bench's)
GROW = 0.8  # share of the steps over which the longest passage drawn grows to LONGEST: short copies are learned first
BATCH_TOKENS = 1600  # records are added to a step until it holds this many tokens
GUIDED = 0.5  # share of the steps whose loss also guides two heads into a copying circuit (see guided_loss)
PREV, INDUCTION = (1, 0), (2, 0)  # (layer, head): a previous-token head, and an induction head after it
CHAT_SHARE = 0.2  # share of records that are the corpus's chats instead of copies
HELD_CODE = "aegis/schedule.py"  # the bench's code file (prose_eval.txt, its text, is not in tiny.CORPUS_PROSE)
REWRITE = [
    "次の文章を、内容を変えずに丁寧な言葉で書き直してください。",
    "次の文章を、内容を変えずに書き直してください。",
    "次の文章を丁寧な言葉で書き直してください。",
]
SUFFIXES = ["_name", "_value", "_new", "_item", "_count"]
KEYWORDS = {"self", "None", "True", "False", "return", "import", "from", "class", "def", "with", "while", "for"}


def code_files() -> list[Path]:
    return sorted(p for p in [*REPO.glob("aegis/**/*.py"), *REPO.glob("tools/*.py")] if p != REPO / HELD_CODE)


def sources() -> tuple[str, list[str], list[str]]:
    """(the training prose, its sentences, the code files' texts)."""
    prose = "\n\n".join((REPO / "aegis" / "corpus" / name).read_text(encoding="utf-8") for name in tiny.CORPUS_PROSE)
    sentences = [s + "。" for s in re.split("。", prose.replace("\n", "")) if s.strip()]
    return prose, sentences, [p.read_text(encoding="utf-8") for p in code_files()]


def prose_record(rng: random.Random, n: int, prose: str, sentences: list[str]) -> tuple[str, str]:
    """A passage of n characters to rewrite and its copy: half the time a window of the prose, else sentences drawn
    at random, a text the model cannot know by heart (it must read the passage to repeat it)."""
    if rng.random() < 0.5:
        start = rng.randrange(len(prose) - n)
        text = prose[start : start + n]
    else:
        text = ""
        while len(text) < n:
            text += rng.choice(sentences) + ("\n\n" if rng.random() < 0.15 else "")
        text = text[:n]
    return f"{rng.choice(REWRITE)}\n\n{text}", text


def code_record(rng: random.Random, n: int, files: list[str]) -> tuple[str, str]:
    """A piece of n characters of a code file (from a line's start, cut anywhere as the bench cuts its own) with a
    name in it renamed: the prompt asks for the rename, the reply is the piece again with the name changed."""
    while True:
        src = rng.choice(files)
        starts = [0] + [m.end() for m in re.finditer("\n", src[: max(1, len(src) - n)])]
        text = src[(s := rng.choice(starts)) : s + n]
        defined = re.findall(r"(?:def|class) ([A-Za-z_]\w{2,})", text)
        names = defined or [w for w in re.findall(r"\b[a-z_][a-z0-9_]{3,}\b", text) if w not in KEYWORDS]
        if len(text) >= min(n, SHORTEST) and names:
            break
    old = rng.choice(names)
    new = old + rng.choice(SUFFIXES)
    what = "関数名" if old in defined else "名前"
    prompt = f"次のコードの{what} {old} を {new} に変えて、ファイル全体を書き直してください。\n\n```python\n{text}\n```"
    renamed = re.sub(rf"\b{old}\b", new, text)
    return prompt, f"```python\n{renamed}\n```"


def encode(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """A chat's tokens (as the server reads them: no BOS) and labels: each assistant turn and its <|end|> learned,
    the rest only read."""
    ids: list[int] = []
    labels: list[int] = []

    def extend(text: str, learn: bool) -> None:
        nonlocal ids
        full = tok(text.removesuffix(tok.eos_token), add_special_tokens=False)["input_ids"]
        assert full[: len(ids)] == ids, "a turn changed the tokens of those before it"
        labels.extend(t if learn else -100 for t in full[len(ids) :])
        ids = full

    for i, m in enumerate(messages):
        if m["role"] == "assistant":  # its header, <|assistant|> and a newline, is read
            extend(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True), False)
        extend(tok.apply_chat_template(messages[: i + 1], tokenize=False), m["role"] == "assistant")
    return ids[:MAX_TOKENS], labels[:MAX_TOKENS]


def chat(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def copy_sources(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """(t, s) for each reply position t whose next token is copied from the prompt: s is the latest prompt position
    that holds that token after the same two tokens as at t (the token prompt lookup would draft)."""
    first = next(i for i, label in enumerate(labels) if label >= 0)
    seen: dict[tuple[int, int], list[int]] = {}
    for s in range(2, first):
        seen.setdefault((ids[s - 2], ids[s - 1]), []).append(s)
    pairs = []
    for t in range(first - 1, len(ids) - 1):
        hits = [s for s in seen.get((ids[t - 1], ids[t]), []) if ids[s] == ids[t + 1]]
        if hits:
            pairs.append((t, hits[-1]))
    return pairs


def train(model, tok, log, steps: int = STEPS) -> None:
    import torch

    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    device = next(model.parameters()).device
    prose, sentences, files = sources()
    chats = [json.loads(line)["messages"] for line in tiny.corpus_path("chat_train.jsonl").open(encoding="utf-8")]
    held = [encode(tok, chat(*record)) for record in bench_records()]

    def record(step: int) -> tuple[list[int], list[int]]:
        if rng.random() < CHAT_SHARE:
            return encode(tok, rng.choice(chats))
        n = rng.randint(SHORTEST, int(START + (LONGEST - START) * min(1.0, step / (GROW * steps))))
        pair = prose_record(rng, n, prose, sentences) if rng.random() < 0.5 else code_record(rng, n, files)
        return encode(tok, chat(*pair))

    def guided_loss(out, records) -> torch.Tensor:
        """How far the two guided heads are from attending where copying needs them to: PREV's head to the token
        before, INDUCTION's head, at a reply token, to the prompt's token that follows the same two tokens there."""
        prev, ind = out.attentions[PREV[0]][:, PREV[1]], out.attentions[INDUCTION[0]][:, INDUCTION[1]]
        terms = []
        for b, (ids, labels) in enumerate(records):
            i = torch.arange(1, len(ids))
            terms.append(-prev[b, i, i - 1].clamp_min(1e-6).log().mean())
            pairs = copy_sources(ids, labels)
            if pairs:
                q, k = torch.tensor(pairs).T
                terms.append(-ind[b, q, k].clamp_min(1e-6).log().mean())
        return sum(terms) / len(records)

    def batch(records: list[tuple[list[int], list[int]]]):
        """Right-padded to the longest, positions shifted at random within the served 2 048 and past 512: llama.cpp
        runs every token of a context longer than 512 on LongRoPE's long factors, transformers only a sequence whose
        positions pass 512 (RoPE's attention sees only the distance between positions, so the shift costs nothing)."""
        n = max(len(ids) for ids, _ in records)
        pad = lambda xs, v: [x + [v] * (n - len(x)) for x in xs]  # noqa: E731
        ids, labels = pad([r[0] for r in records], tok.pad_token_id), pad([r[1] for r in records], -100)
        mask = pad([[1] * len(r[0]) for r in records], 0)
        shift = rng.randint(max(0, 513 - n), max(0, 2048 - n))
        positions = torch.arange(shift, shift + n).expand(len(records), n)
        return torch.tensor(ids), torch.tensor(labels), torch.tensor(mask), positions

    @torch.no_grad()
    def agreement() -> list[float]:
        model.eval()
        out = []
        for ids, labels in held:
            x, y, _, positions = (t.to(device) for t in batch([(ids, labels)]))
            guess = model(input_ids=x, position_ids=positions).logits[0, :-1].argmax(-1)
            want = y[0, 1:]
            out.append(round(((guess == want) & (want >= 0)).sum().item() / (want >= 0).sum().item(), 3))
        model.train()
        return out

    model.set_attn_implementation("eager")  # the guided steps read the heads' attention
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.95))
    model.train()
    start, recent = time.time(), []
    log(f"held-out reply tokens predicted (rewrite, code edit) before: {agreement()}")
    for step in range(1, steps + 1):
        for g in opt.param_groups:  # warm-up, then a cosine to a tenth
            g["lr"] = LR * min(1.0, step / WARMUP) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        records = [record(step)]
        while sum(len(r[0]) for r in records) < BATCH_TOKENS:
            records.append(record(step))
        x, y, mask, positions = (t.to(device) for t in batch(records))
        guided = step <= GUIDED * steps
        if step == int(GUIDED * steps) + 1:
            model.set_attn_implementation("sdpa")
        out = model(input_ids=x, attention_mask=mask, position_ids=positions, labels=y, output_attentions=guided)
        loss = out.loss + guided_loss(out, records) if guided else out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-20:]
        if step % 20 == 0 or step == steps:
            avg = sum(recent) / len(recent)
            log(f"step {step}/{steps} loss {avg:.3f} held-out {agreement()} ({time.time() - start:.0f}s)")
    model.eval()


def bench_records() -> list[tuple[str, str]]:
    """The bench's two grounded prompts (held out) and the replies they ask for: the text again; the code again with
    phase renamed."""
    tasks = grounded_tasks(1400)
    code = tasks["code edit"].split("```python\n", 1)[1].removesuffix("\n```")
    renamed = re.sub(r"\bphase\b", "phase_name", code)
    return [
        (tasks["rewrite"], tasks["rewrite"].split("\n\n", 1)[1]),
        (tasks["code edit"], f"```python\n{renamed}\n```"),
    ]


def fingerprint() -> str:
    """This script, the tiny model's weights and the texts trained on: what the GGUF is made from."""
    h = hashlib.sha256(Path(__file__).read_bytes() + tiny.fingerprint().encode())
    for path in [*(tiny.corpus_path(n) for n in [*tiny.CORPUS_PROSE, "chat_train.jsonl"]), *code_files()]:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def trained(model_dir: Path, log, steps: int = STEPS) -> Path:
    """Fine-tune the tiny model (on CUDA where there is one) into model_dir, with its tokenizer and template."""
    import torch
    from transformers import AutoTokenizer, Phi3ForCausalLM

    base = tiny.ensure(log=log)
    shutil.copytree(base, model_dir)  # the tokenizer and template travel with the weights
    (model_dir / tiny.INFO).unlink()  # that file describes the shipped weights, not these
    tok = AutoTokenizer.from_pretrained(base)
    model = Phi3ForCausalLM.from_pretrained(base, dtype=torch.float32)
    train(model.to("cuda" if torch.cuda.is_available() else "cpu"), tok, log, steps)
    model.to(torch.bfloat16).save_pretrained(model_dir)
    return model_dir


def export(model_dir: Path, out: Path) -> Path:
    """The q8_0 GGUF of a trained model directory (llama.cpp parity checked)."""
    cmd = [sys.executable, "-m", "export", "gguf", "--model", str(model_dir), "--out", str(out)]
    subprocess.run([*cmd, "--type", "q8_0", "--name", "copy-tiny", "--no-progress"], cwd=REPO, check=True)
    return out


def ensure(cache: Path, log=print, steps: int = STEPS, model_dir: Path | None = None) -> Path:
    """The copying model's GGUF, made once per fingerprint and step count under `cache` (older ones removed);
    exported from model_dir where given (what --save wrote elsewhere), else trained here first."""
    key = f"{fingerprint()}-{steps}" if model_dir is None else "dir-" + digest_dir(model_dir)
    out = Path(cache) / f"copy-{key}" / "copy-tiny-q8_0.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if model_dir is not None:
        export(model_dir, out)
    else:
        with tempfile.TemporaryDirectory(prefix=".copy-", dir=out.parent) as work:
            export(trained(Path(work) / "copy-tiny", log, steps), out)
    for old in Path(cache).glob("copy-*"):
        if old != out.parent:
            shutil.rmtree(old, ignore_errors=True)
    return out


def digest_dir(model_dir: Path) -> str:
    """A key for a trained model directory: its weights' digests."""
    from aegis.atomic import sha256_file

    digests = [sha256_file(path) for path in sorted(Path(model_dir).glob("*.safetensors"))]
    return hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/copy_model.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aegis-copy-model")
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps")
    ap.add_argument("--save", type=Path, help="train only: write the model directory here (a new folder)")
    ap.add_argument("--model-dir", type=Path, help="export this model directory (what --save wrote) instead")
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.save and args.model_dir:
        ap.error("--save trains, --model-dir exports what was trained: one or the other")
    if args.save and args.save.exists():
        ap.error(f"--save {args.save}: exists already")
    if args.model_dir and not (args.model_dir / "config.json").is_file():
        ap.error(f"--model-dir {args.model_dir}: no config.json there")
    print(trained(args.save, log, args.steps) if args.save else ensure(args.cache, log, args.steps, args.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
