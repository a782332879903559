"""Training throughput at Phi-3.5-mini's exact shapes (random weights; no hub on the GPU machine).

One run measures, side by side on the same card and the same real tokens:
  (a) plain PEFT + bitsandbytes QLoRA: NF4 + double quant, bf16 compute, LoRA r16/α32/dropout 0.05 on qkv_proj +
      o_proj, prepare_model_for_kbit_training, AdamW 2e-4, HF forward with labels, in training mode (checked: the
      layers are training and, where the row says so, checkpointed);
  (b) `python -m train` (the product's own path: soul + seed schedule), run as a user runs it, through the Borea
      config file with the base laid out as a hub snapshot (HF_HUB_OFFLINE=1), so the Borea code path is the one timed;
  (c) Unsloth, on the same snapshot and windows: bench/train_unsloth.py, in its own process and environment (its
      transformers pin is older than ours needs), after ours on the same card.
Reported: tokens/s of real (non-padding) tokens (median over steps after warm-up), step time, peak
torch.cuda.max_memory_allocated, and the mean loss of the last steps (speed must not come from doing less work).

    python bench/train_throughput.py --work /tmp/bench --steps 30 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import PHI35, ramp_factors, train_steps  # noqa: E402

HUB_ID = "HODACHI/Borea-Phi-3.5-mini-Instruct-Jp"
COMMIT = "0" * 40
WARMUP = 3
CORPUS = ["embedded:prose_train_a.txt", "embedded:prose_train_b.txt", "embedded:prose_train_c.txt"]


def build_model(hf_home: Path) -> Path:
    """A random Phi-3.5-mini-shaped model saved as a hub snapshot of the Borea id, with the tiny tokenizer."""
    from transformers import AutoTokenizer, Phi3ForCausalLM

    from aegis.tiny import ensure, phi3_config

    repo = hf_home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    if (snap / "config.json").exists():
        return snap
    cfg = phi3_config(PHI35, ramp_factors)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Phi3ForCausalLM(cfg).to(torch.bfloat16)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)
    model.save_pretrained(snap)
    AutoTokenizer.from_pretrained(ensure()).save_pretrained(snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    del model
    torch.cuda.empty_cache()
    return snap


def dataset_snapshot(hf_home: Path) -> Path:
    """The seed's dataset id as a hub snapshot holding the embedded corpus, so the Borea config runs unchanged."""
    from aegis.tiny import corpus_path

    repo = hf_home / "hub" / "datasets--TFMC--imatrix-dataset-for-japanese-llm"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    for name in ("prose_train_a.txt", "prose_train_b.txt", "prose_train_c.txt"):
        shutil.copy(corpus_path(name), snap / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


def windows(snap: Path, steps: int, batch: int, length: int, repeat: int = 1, seed: int = 42):
    """The micro-batches `python -m train` trains on (same corpus, packing, shuffle and seed as the Borea config with
    the bench's data.train), so both paths see the same windows in the same order."""
    from transformers import AutoTokenizer

    from train import batches, data

    tok = AutoTokenizer.from_pretrained(snap)
    ex = data.load(CORPUS * repeat, tok)
    stream = batches.Stream(ex, length, seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return [batches.collate(stream.next_update(batch, 1)[0], pad, length) for _ in range(steps)]


def check_plain_mode(model, ckpt: bool) -> None:
    """The baseline does what its row says: training mode (LoRA dropout active) and, when the row says so, every
    decoder layer checkpointed (transformers checkpoints a layer only when it is training and flagged)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert model.training and layers and all(m.training for m in layers + dropouts), "not in training mode"
    assert dropouts and all(d.p == 0.05 for d in dropouts), "LoRA dropout is not 0.05"
    flagged = [bool(getattr(m, "gradient_checkpointing", False)) for m in layers]
    assert all(f == ckpt for f in flagged), f"checkpointing {ckpt} asked, layers flagged {set(flagged)}"


def plain_peft(snap: Path, steps: int, batch: int, length: int, ckpt: bool, repeat: int = 1) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.cuda.reset_peak_memory_stats()
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    # the hub's kernels off, as for ours (aegis/pretrained.py): the GPU machine has no network to fetch them from
    model = AutoModelForCausalLM.from_pretrained(
        snap, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0}, use_kernels=False
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert model.is_gradient_checkpointing == ckpt
    model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM", target_modules=["qkv_proj", "o_proj"]
        ),
    )
    # from_pretrained leaves the model in eval mode, where transformers never checkpoints and PEFT applies no LoRA
    # dropout: a user's Trainer or loop trains in training mode, and so does this baseline
    model.train()
    check_plain_mode(model, ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    batches = windows(snap, steps, batch, length, repeat)
    torch.cuda.reset_peak_memory_stats()
    tokens, losses, times = train_steps(model, batches, params, opt)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    torch.cuda.empty_cache()
    step_s = statistics.median(times[WARMUP:])
    return {
        "tokens_per_s": statistics.median(n / t for n, t in zip(tokens[WARMUP:], times[WARMUP:])),
        "step_s": step_s,
        "peak_gib": peak,
        "loss_last5": statistics.mean(losses[-5:]),
        "losses": losses,
    }


def ours(
    snap: Path,
    hf_home: Path,
    work: Path,
    steps: int,
    batch: int,
    length: int,
    ckpt: bool | str,
    extra: list[str],
    nprocs: int = 1,
    profile: int = 0,
    repeat: int = 1,
) -> dict:
    run = work / f"run_b{batch}x{length}_{'ckpt' if ckpt else 'nockpt'}_n{nprocs}"
    shutil.rmtree(run, ignore_errors=True)
    flag = '"auto"' if ckpt == "auto" else "true" if ckpt else "false"  # "auto": the memory plan decides
    sets = [
        f"schedule.total_steps={steps}",
        f"schedule.warmup_steps={max(1, steps // 10)}",
        f"schedule.anneal_steps={steps * 8 // 10}",
        f"train.save_steps={steps}",
        f"train.batch_size={batch}",
        f"train.max_length={length}",
        f"model.gradient_checkpointing={flag}",
        "data.train=" + json.dumps(CORPUS * repeat),
    ]
    launch = (
        [sys.executable]
        if nprocs == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nprocs)]
    )
    cmd = (
        launch
        + [
            "-m",
            "train",
            "--config",
            str(ROOT / "configs" / "borea_rtx3060.toml"),
            "--run-dir",
            str(run),
            "--no-progress",
        ]
        + [a for s in sets + extra for a in ("--set", s)]
    )
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", AEGIS_PROFILE=str(profile))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    from aegis.metrics import read

    recs = read(run)
    said = next((line for line in (proc.stdout + proc.stderr).splitlines() if "memory plan:" in line), "")
    step_s = statistics.median(r["tokens"] / r["tokens_per_s"] for r in recs[WARMUP:])
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs[WARMUP:]),
        "step_s": step_s,
        "peak_gib": max(r["gpu_mem_gib"] for r in recs),
        "loss_last5": statistics.mean(r["loss"] for r in recs[-5:]),
        "losses": [r["loss"] for r in recs],
        "updates": len(recs),
        "final_gate": recs[-1]["gate"],
        "ortho_error": max(r["ortho_error"] for r in recs),
        "wall_s": time.time() - t0,
        "checkpoint": sorted(p.name for p in (run / "checkpoints").iterdir()),
        "nprocs": nprocs,
        "plan": said,
        "checkpointing": "gradient checkpointing on" in said if said else ckpt,
        "profile": (run / "profile.txt").read_text() if profile else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/aegis-bench"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--settings",
        default="seed,throughput",
        help="seed = 1x512 no checkpointing; "
        "throughput = BxL with gradient checkpointing (see --tp-batch); long (see --long-lengths)",
    )
    ap.add_argument("--tp-batch", type=int, default=8)
    ap.add_argument("--which", default="plain,ours")
    ap.add_argument("--ours-set", action="append", default=[], help="extra --set for all our runs")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE[;KEY=VALUE]",
        help="run ours once per variant with these extra --set (e.g. eager=train.cuda_graphs=false)",
    )
    ap.add_argument("--plain-tp-batch", type=int, default=0, help="plain's throughput micro-batch (default --tp-batch)")
    ap.add_argument(
        "--plain-search",
        default="",
        metavar="B1,B2c,B3n,...",
        help="throughput setting: run plain at each of these batch sizes, with and without checkpointing "
        "(a c or n suffix: only with, only without), "
        "and report its best within --budget-gib (the row it is compared by)",
    )
    ap.add_argument("--budget-gib", type=float, default=12.0)
    ap.add_argument(
        "--long-lengths",
        default="8192,16384,32768,65536,81920",
        help="long = one sequence of each length, ours with the memory plan's choices; plain "
        "(checkpointed) at --plain-long-lengths, its longest within "
        "--budget-gib reported",
    )
    ap.add_argument("--plain-long-lengths", default="2048,4096,8192,12288,16384")
    ap.add_argument("--long-steps", type=int, default=8)
    ap.add_argument("--nprocs", default="1", help="process counts for our runs, e.g. 1,2 (one GPU each)")
    ap.add_argument("--profile", type=int, default=0, help="profile this many updates of our first run")
    ap.add_argument("--out", type=Path, default=Path("train_throughput.json"))
    ap.add_argument("--prepare-only", action="store_true", help="lay out the model and dataset snapshots, then stop")
    args = ap.parse_args()
    hf_home = args.work / "hf"
    snap = build_model(hf_home)
    dataset_snapshot(hf_home)
    if args.prepare_only:
        return
    grid = {"seed": (1, 512, False), "throughput": (args.tp_batch, 512, True)}  # plain's; ours: the plan decides
    variants = [(v.partition("=")[0], [s for s in v.partition("=")[2].split(";") if s]) for v in args.variant]
    variants = variants or [("", [])]
    results = {
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")},
        "command": " ".join(sys.argv),
        "rows": [],
    }
    for name in args.settings.split(","):
        if name == "long":
            run_long(args, snap, hf_home, results)
            continue
        batch, length, ckpt = grid[name]
        jobs = []
        if "plain" in args.which:
            if name == "throughput" and args.plain_search:
                jobs += [("plain", 1, [], b, c) for b, c in plain_search(args.plain_search)]
            else:
                jobs.append(("plain", 1, [], (args.plain_tp_batch or batch) if name == "throughput" else batch, ckpt))
        jobs += [
            (f"ours {label}".strip(), int(n), sets, batch, "auto")
            for n in args.nprocs.split(",")
            for label, sets in variants
            if "ours" in args.which
        ]
        for which, n, sets, b, c in jobs:
            print(f"== {name}: {which} x{n} {b}x{length} checkpointing={c}", flush=True)
            try:
                r = (
                    plain_peft(snap, args.steps, b, length, c)
                    if which == "plain"
                    else ours(snap, hf_home, args.work, args.steps, b, length, c, args.ours_set + sets, n, args.profile)
                )
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"out of memory: {which} {b}x{length} checkpointing={c}", flush=True)
                continue
            except RuntimeError as e:  # a failed run of ours is reported and the others still run
                print(f"failed: {which} {b}x{length}: {e}", flush=True)
                results.setdefault("failed", []).append({"setting": name, "which": which, "error": str(e)[-3000:]})
                continue
            args.profile = 0 if which != "plain" else args.profile
            r.update(setting=name, which=which, batch=b, length=length, nprocs=n)
            r.setdefault("checkpointing", c)  # ours: what its memory plan chose
            results["rows"].append(r)
            print({k: v for k, v in r.items() if k != "losses"}, flush=True)
            args.out.write_text(json.dumps(results, indent=1))
        plain = [
            r
            for r in results["rows"]
            if r["which"] == "plain" and r["setting"] == name and r["peak_gib"] <= args.budget_gib
        ]
        if plain:
            best = max(plain, key=lambda r: r["tokens_per_s"])
            best["best_plain_within_budget"] = True
            print(
                f"{name}: plain's best within {args.budget_gib:g} GiB: {best['batch']}x{length} checkpointing="
                f"{best['checkpointing']}, {best['tokens_per_s']:.0f} tokens/s, {best['peak_gib']:.2f} GiB"
            )
    print("\n| setting | path | GPUs | batch×len per GPU | ckpt | tokens/s | step ms | peak GiB | loss (last 5) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(
            f"| {r['setting']} | {r['which']} | {r['nprocs']} | {r['batch']}×{r['length']} | {r['checkpointing']} | "
            f"{r['tokens_per_s']:.0f} | {1000 * r['step_s']:.0f} | {r['peak_gib']:.2f} | {r['loss_last5']:.3f} |"
        )
    compare_losses(results)
    args.out.write_text(json.dumps(results, indent=1))


def plain_search(spec: str) -> list[tuple[int, bool]]:
    """ "8,16" runs each batch size with and without checkpointing; a suffix picks one: "2n" without, "16c" with."""
    out = []
    for item in spec.split(","):
        modes = {"c": (True,), "n": (False,)}.get(item[-1], (True, False))
        out += [(int(item.rstrip("cn")), c) for c in modes]
    return out


def corpus_repeat(snap: Path, windows_needed: int, length: int) -> int:
    """How many copies of the corpus give every step of a long run a full window: the embedded corpus is ~34 k
    tokens, so at 32 k one epoch packs one full window and a short remainder (padded to 32 k, it would be timed as a
    step of a few hundred tokens)."""
    from transformers import AutoTokenizer

    from train import data

    tokens = sum(len(e.input_ids) for e in data.load(CORPUS, AutoTokenizer.from_pretrained(snap)))
    return -(-windows_needed * length // tokens) + 1


def run_long(args, snap: Path, hf_home: Path, results: dict) -> None:
    """One sequence per step at each length: ours as the planner decides (checkpointing, offload, chunked loss);
    plain checkpointed, its best chance, up to the first length over the budget or out of memory."""
    jobs = [("ours", int(n)) for n in args.long_lengths.split(",") if n and "ours" in args.which]
    jobs += [("plain", int(n)) for n in args.plain_long_lengths.split(",") if n and "plain" in args.which]
    repeat = corpus_repeat(snap, args.long_steps + 1, max(n for _, n in jobs))
    over = False
    for which, length in jobs:
        if which == "plain" and over:
            continue
        print(f"== long: {which} 1x{length}", flush=True)
        try:
            r = (
                plain_peft(snap, args.long_steps, 1, length, True, repeat)
                if which == "plain"
                else ours(snap, hf_home, args.work, args.long_steps, 1, length, "auto", args.ours_set, repeat=repeat)
            )
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"out of memory: {which} 1x{length}", flush=True)
            over = over or which == "plain"
            continue
        except RuntimeError as e:
            print(f"failed: {which} 1x{length}: {e}", flush=True)
            results.setdefault("failed", []).append({"setting": "long", "which": which, "error": str(e)[-3000:]})
            continue
        over = over or (which == "plain" and r["peak_gib"] > args.budget_gib)
        r.update(setting="long", which=which, batch=1, length=length, nprocs=1)
        r.setdefault("checkpointing", True)  # plain always; ours: what its memory plan chose
        results["rows"].append(r)
        print({k: v for k, v in r.items() if k not in ("losses", "profile")}, flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    for which in ("plain", "ours"):
        longest = max(
            (
                r["length"]
                for r in results["rows"]
                if r["setting"] == "long" and r["which"] == which and r["peak_gib"] <= args.budget_gib
            ),
            default=0,
        )
        results[f"longest_{which}_within_budget"] = longest
        print(f"long: {which}'s longest within {args.budget_gib:g} GiB: {longest} tokens", flush=True)


def compare_losses(results: dict) -> None:
    """Same windows in the same order on both paths, so per-step losses compare directly. The noise scale is
    plain's own step-to-step change (the windows differ from step to step)."""
    for plain in (r for r in results["rows"] if r["which"] == "plain"):
        noise = statistics.mean(abs(a - b) for a, b in zip(plain["losses"], plain["losses"][1:]))
        for r in results["rows"]:
            if r["which"] == "plain" or (r["setting"], r["batch"], r["length"]) != (
                plain["setting"],
                plain["batch"],
                plain["length"],
            ):
                continue
            diff = [a - b for a, b in zip(r["losses"], plain["losses"])]
            r["loss_vs_plain"] = {
                "mean_diff": statistics.mean(diff),
                "mean_abs_diff": statistics.mean(map(abs, diff)),
                "plain_step_to_step": noise,
            }
            print(
                f"{r['setting']} {r['which']} vs plain, same windows: mean loss difference "
                f"{statistics.mean(diff):+.4f}, mean |difference| {statistics.mean(map(abs, diff)):.4f} "
                f"(plain's own step-to-step change {noise:.4f})"
            )


if __name__ == "__main__":
    main()
