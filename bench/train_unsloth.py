"""Unsloth's QLoRA timed on the model and windows of bench/train_throughput.py, run as Unsloth's docs tell users.

`FastLanguageModel.from_pretrained(dir, load_in_4bit=True, max_seq_length=...)`, then
`FastLanguageModel.get_peft_model(r=16, lora_alpha=32, lora_dropout=0 (its advice) or 0.05 (the seed recipe),
use_gradient_checkpointing="unsloth" (its default), bias="none")` on the same adapters as ours (attention: qkv_proj +
o_proj, or q/k/v/o in the llamafied form; `--targets all` adds the MLP), the model in training mode, AdamW 2e-4,
gradient clipping at 1.0, the HF forward with labels. Two forms of the same random weights: Phi-3 as Borea ships it
(fused projections: Unsloth's generic path) and llamafied (bench/llamafy.py: Unsloth's Llama kernels).

Rows, each on the training windows ours sees (train.batches.Stream, same corpus and seed), LoRA re-initialised and a new
optimizer per row so every row starts where ours does:
  seed        1 x 512;
  throughput  batch x 512 for --tp-batches in order, up to the first over --budget-gib or no faster than the one
              before (its best within the budget counts);
  long        one sequence: --long-start and twice it, then the length where the budget falls on the line through
              their peaks, then one step (8192) up or down: the longest within the budget.
tokens/s is the median over the steps after --warmup; peak is torch.cuda.max_memory_allocated over the row. Every
load is checked and the checks written with its rows: training mode, LoRA dropout, 4-bit base layers, and
checkpointing seen, not assumed (decoder-layer forwards counted over one step: 2 per layer means recomputed).

Unsloth pins transformers <= 5.17 while ours needs >= 5.21, so this runs in its own process with its own PYTHONPATH,
after ours on the same card; Unsloth is imported before transformers, and never reaches the network (the flags are
set here before the import).

    python bench/train_unsloth.py --work /tmp/b --form llama --out unsloth_llama.json
    python bench/train_unsloth.py --table ours.json unsloth_llama.json unsloth_fused.json   # markdown for BENCHMARKS
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Offline, no statistics ping, no telemetry: the GPU machine has no network and a timed run must not wait on one.
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_ENABLE_HF_TRANSFER": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
TARGETS = {
    ("fused", "attn"): ["qkv_proj", "o_proj"],
    ("fused", "all"): ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ("llama", "attn"): ["q_proj", "k_proj", "v_proj", "o_proj"],
    ("llama", "all"): ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


NO_COMPILE = "UNSLOTH_COMPILE_DISABLE"  # set to 1 (in the environment), Unsloth runs its blocks uncompiled


class Deadline(Exception):
    """No time left for another row (the device call has a hard limit)."""


def setup_env() -> None:
    for k, v in OFFLINE.items():
        os.environ[k] = v


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "unsloth",
        "unsloth_zoo",
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "trl",
        "accelerate",
        "triton",
        "xformers",
        "flash_attn",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def attention_backend() -> dict:
    """Which attention kernels Unsloth found (xformers and flash-attn are optional; without them it uses SDPA)."""
    try:
        from unsloth.models import _utils as u

        return {
            "flash_attention": bool(getattr(u, "HAS_FLASH_ATTENTION", False)),
            "xformers": getattr(u, "xformers", None) is not None,
        }
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        return {"error": repr(e)}


def load(model_dir: Path, form: str, targets: str, dropout: float, max_seq_length: int):
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=max_seq_length, load_in_4bit=True, dtype=None
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=dropout,
        target_modules=TARGETS[(form, targets)],
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
    )
    model.train()  # as a Trainer does before its first step
    return model


def decoder_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def check(model, dropout: float) -> dict:
    """What the rows of this load really do, as far as the model tells without running it (recorded with them;
    `ok` says all held; checkpointing is seen by `forwards` after the rows)."""
    layers = decoder_layers(model)
    drops = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    ps = sorted({float(getattr(d, "p", 0.0)) for d in drops})  # p = 0 is an nn.Identity in PEFT
    try:  # bitsandbytes' own class (PEFT's LoRA wrapper around it shares the name)
        from bitsandbytes.nn import Linear4bit

        four = [m for m in model.modules() if isinstance(m, Linear4bit)]
    except ImportError:
        four = []
    states = [getattr(m.weight, "quant_state", None) for m in four]
    lora = [n for n, m in model.named_modules() if n.endswith(".lora_A")]
    out = {
        "training": bool(model.training) and bool(layers) and all(m.training for m in layers + drops),
        "decoder_layers": len(layers),
        "lora_layers": len(lora),
        "lora_targets": sorted({n.split(".")[-2] for n in lora}),
        "lora_dropout_p": ps,
        "dropout_ok": bool(drops) and ps == [float(dropout)],
        "linear4bit_layers": len(four),
        "quant_types": sorted({getattr(s, "quant_type", "?") for s in states if s is not None}),
        "double_quant": sorted({bool(getattr(s, "nested", False)) for s in states if s is not None}),
        "flags_gradient_checkpointing": sorted({str(getattr(m, "gradient_checkpointing", None)) for m in layers}),
        "model_flag": str(getattr(model, "is_gradient_checkpointing", None)),
    }
    # 4 or 7 projections per layer in 4 bits, whichever form: the base really is quantized
    out["four_bit_ok"] = len(four) >= len(layers) * 4 and out["quant_types"] == ["nf4"]
    if layers:  # Unsloth's fast-path patches on the first layer, for the record
        attn, mlp = getattr(layers[0], "self_attn", None), getattr(layers[0], "mlp", None)
        out["layer0_patches"] = {
            k: getattr(getattr(o, k, None), "__name__", None)
            for o, k in ((attn, "apply_qkv"), (attn, "apply_o"), (mlp, "forward"), (layers[0], "forward"))
        }
    out["ok"] = out["training"] and out["dropout_ok"] and out["four_bit_ok"]
    return out


def forwards(model, batch: dict) -> dict:
    """Whether a training step runs each layer again in backward (checkpointing), by counting forwards with hooks.
    Run after the timed rows: hooks on compiled blocks make torch.compile compile them again, which took Unsloth's
    first load past the whole benchmark's time on an H100."""
    import torch

    layers = decoder_layers(model)
    out = {}
    # Forwards counted on each layer and on its attention and MLP blocks: a checkpointed layer runs its blocks
    # again in backward. Which of these calls go through nn.Module.__call__ (where hooks fire) depends on the
    # release (transformers 5.2x re-runs the layer's own forward; Unsloth's kernels call the blocks), so the most
    # any of them saw is what counts.
    parts = {
        "layer": layers,
        "self_attn": [getattr(m, "self_attn", None) for m in layers],
        "mlp": [getattr(m, "mlp", None) for m in layers],
    }
    calls = {k: [] for k in parts}
    hooks = [
        m.register_forward_pre_hook(lambda *_, k=k: calls[k].append(1))
        for k, ms in parts.items()
        for m in ms
        if m is not None
    ]
    try:
        dev = next(model.parameters()).device
        ids, mask, labels = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - hooks inside compiled code may break a step; the rows still run
        out["count_error"] = repr(e)[-1000:]
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    seen = {k: len(v) / max(1, len(layers)) for k, v in calls.items()}
    out["forwards_per_layer_per_step"] = seen
    out["layer_forwards_per_step"] = max(seen.values())  # 2: each layer ran again in backward, i.e. checkpointed
    out["checkpointing_seen"] = out["layer_forwards_per_step"] >= 2
    return out


def train_row(model, batches: list, warmup: int, init: dict) -> dict:
    """Steps on `batches` from the freshly initialised LoRA with a new AdamW; timed after `warmup` steps."""
    import torch

    from bench.common import train_steps

    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])
    opt = torch.optim.AdamW(params, lr=2e-4)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        tokens, losses, times = train_steps(model, batches, params, opt)
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
    timed = list(zip(tokens[warmup:], times[warmup:])) or list(zip(tokens, times))
    return {
        "tokens_per_s": statistics.median(n / t for n, t in timed),
        "step_s": statistics.median(t for _, t in timed),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "losses": losses,
        "loss_first": losses[0],
        "loss_last5": statistics.mean(losses[-5:]),
        "steps": len(losses),
        "warmup": warmup,
        "first_step_s": times[0],
    }


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


class Runner:
    """Rows of one load: each checked against the deadline, written to the JSON as soon as it is measured."""

    def __init__(self, args, results: dict, snap: Path):
        self.args, self.results, self.snap = args, results, snap
        self.tokens_per_s = 0.0  # the last row's, to tell whether the next one fits in the time left
        self.reserve = 0.0  # seconds kept for the loads still to come

    def save(self) -> None:
        tmp = self.args.out.with_name(self.args.out.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.args.out)

    def left(self) -> float:
        return self.args.deadline - time.time() - self.reserve if self.args.deadline else float("inf")

    def row(
        self, model, init, label: dict, batch: int, length: int, steps: int, warmup: int, repeat: int = 1
    ) -> dict | None:
        """One measured row, or None when it ran out of memory (recorded as such)."""
        import torch

        from bench.train_throughput import windows

        tag = f"{label['which']} {label['setting']} {batch}x{length}"
        need = self.args.row_reserve_s  # longer sequences cost more per token: count them twice
        if self.tokens_per_s:
            need += steps * batch * length / self.tokens_per_s * (2 if length > 512 else 1.2)
        if self.left() < need:
            raise Deadline(f"{self.left():.0f} s left, {tag} needs about {need:.0f}")
        print(f"== {time.strftime('%H:%M:%S')} {tag}", flush=True)
        try:
            r = train_row(model, windows(self.snap, steps, batch, length, repeat), warmup, init)
        except Exception as e:  # noqa: BLE001 - out of memory is a result; anything else is recorded
            gc.collect()
            torch.cuda.empty_cache()
            oom = is_oom(e)
            print(f"{'out of memory' if oom else 'failed'}: {tag}: {str(e)[-500:]}", flush=True)
            self.results.setdefault("oom" if oom else "failed", []).append(
                dict(label, batch=batch, length=length, error=str(e)[-2000:])
            )
            self.save()
            if not oom:
                raise
            return None
        r.update(label, batch=batch, length=length)
        self.tokens_per_s = r["tokens_per_s"]
        r["within_budget"] = r["peak_gib"] <= self.args.budget_gib
        self.results["rows"].append(r)
        self.save()
        print({k: v for k, v in r.items() if k not in ("losses", "checks")}, flush=True)
        return r

    def throughput(self, model, init, label: dict) -> None:
        """--tp-batches in order until one is over the budget, or no faster than the one before (a larger batch then
        buys nothing); when the first is already over, half of it. The fastest within the budget is marked."""
        label, done = dict(label, setting="throughput"), []
        sizes = list(self.args.tp_batches)
        try:
            while sizes:
                b = sizes.pop(0)
                r = self.row(model, init, label, b, 512, self.args.steps + self.args.warmup, self.args.warmup)
                if r is None or not r["within_budget"]:
                    if not done and b > 1:
                        sizes = [b // 2]
                        continue
                    break
                done.append(r)
                if len(done) > 1 and r["tokens_per_s"] <= done[-2]["tokens_per_s"]:
                    break
        finally:  # also when the deadline stopped the search: the best of what was measured
            if done:
                max(done, key=lambda r: r["tokens_per_s"])["best_within_budget"] = True
                self.save()

    def long(self, model, init, label: dict) -> None:
        """Longest single sequence within the budget in few rows (a very long one costs a minute): two lengths give
        the peak's growth per token, the next is where the budget falls by that line, then one step either way."""
        from bench.train_throughput import corpus_repeat

        label, step, top, budget = dict(label, setting="long"), 8192, self.args.max_long, self.args.budget_gib
        steps = self.args.long_steps + self.args.long_warmup
        repeat = corpus_repeat(self.snap, steps + 1, top)
        fits, peak = {}, {}

        def probe(n: int) -> bool:
            if n not in fits:
                r = self.row(model, init, label, 1, n, steps, self.args.long_warmup, repeat)
                fits[n], peak[n] = (r is not None and r["within_budget"]), (r["peak_gib"] if r else float("inf"))
            return fits[n]

        cut = True
        try:
            self._search(probe, fits, peak, top, step, budget)
            cut = False
        finally:  # also when the deadline cut it short: the longest seen so far, and that it is a lower bound
            longest = max((n for n, ok in fits.items() if ok), default=0)
            self.results.setdefault("longest_within_budget", {})[label["which"]] = longest
            if cut:
                self.results.setdefault("long_search_cut_short", []).append(label["which"])
            self.save()

    def _search(self, probe, fits: dict, peak: dict, top: int, step: int, budget: float) -> None:
        n1 = self.args.long_start
        while not probe(n1) and n1 > 2048:  # already over: halve
            n1 //= 2
        n2 = min(top, 2 * n1)
        if fits[n1] and n2 > n1:
            if not probe(n2):
                probe((n1 + n2) // 2 // 4096 * 4096)
            elif n2 < top:
                slope = (peak[n2] - peak[n1]) / (n2 - n1)
                guess = top if slope <= 0 else n2 + (budget - peak[n2]) / slope * 0.97
                n3 = int(min(top, max(n2 + step, guess // step * step)))
                if probe(n3):
                    if n3 < top:
                        probe(min(top, n3 + step))
                elif n3 - step > n2:
                    probe(n3 - step)


def run(args) -> None:
    setup_env()
    # Unsloth writes its patched modelling code to ./unsloth_compiled_cache: run in the work directory, not the
    # repository (its default location, as users get it)
    args.out, args.work = args.out.resolve(), args.work.resolve()
    (args.work / "unsloth-cwd").mkdir(parents=True, exist_ok=True)
    os.chdir(args.work / "unsloth-cwd")
    t0 = time.time()
    import torch
    import unsloth  # noqa: F401 - before transformers, as Unsloth requires

    from bench.train_throughput import build_model, windows

    print(f"unsloth imported in {time.time() - t0:.0f} s", flush=True)
    snap = build_model(args.work / "hf")  # ours has laid it out already; built here only when run alone
    model_dir = snap
    if args.form == "llama":
        from bench.llamafy import convert

        model_dir = args.work / "phi35-llamafied"
        if not (model_dir / "config.json").exists():
            t = time.time()
            convert(snap, model_dir)
            print(f"llamafied in {time.time() - t:.0f} s", flush=True)
    results = {
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "attention": attention_backend(),
        "form": args.form,
        "model_dir": str(model_dir),
        "budget_gib": args.budget_gib,
        "command": " ".join(sys.argv),
        "env": dict(OFFLINE) | {k: v for k, v in os.environ.items() if k.startswith("UNSLOTH_")},  # its own too
        "rows": [],
        "loads": [],
    }
    runner = Runner(args, results, snap)
    for i, dropout in enumerate(args.dropouts):
        off = " compile off" if os.environ.get(NO_COMPILE) == "1" else ""
        which = f"unsloth {args.form} dropout {dropout:g}{off}"
        longest = "long" in args.settings and dropout == args.long_dropout
        msl = max(args.max_seq_length, args.max_long if longest else 0)
        label = {
            "which": which,
            "form": args.form,
            "lora_dropout": dropout,
            "targets": args.targets,
            "max_seq_length": msl,
            "checkpointing": "unsloth",
        }
        runner.reserve = (len(args.dropouts) - 1 - i) * args.load_budget_s
        try:
            if runner.left() < args.load_reserve_s:
                raise Deadline(f"{runner.left():.0f} s left, a load takes longer")
            t = time.time()
            print(f"== {time.strftime('%H:%M:%S')} load {which} max_seq_length={msl}", flush=True)
            model = load(model_dir, args.form, args.targets, dropout, msl)
            load_s = time.time() - t
            checks = check(model, dropout)
            print(f"loaded in {load_s:.0f} s; checks: {checks}", flush=True)
            results["loads"].append(dict(label, load_s=load_s, checks=checks))
            label["checks_ok"] = None  # until checkpointing is seen, after the rows
            runner.save()
            init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            if "seed" in args.settings:
                runner.row(model, init, dict(label, setting="seed"), 1, 512, args.steps + args.warmup, args.warmup)
            if "throughput" in args.settings:
                runner.throughput(model, init, label)
            if longest:
                runner.long(model, init, label)
            if runner.left() > args.row_reserve_s:  # checkpointing seen, now that nothing timed follows
                checks |= forwards(model, windows(snap, 1, 1, 512)[0])
                checks["ok"] = checks["ok"] and checks["checkpointing_seen"]
                for r in results["rows"]:
                    if r["which"] == label["which"]:
                        r["checks_ok"] = checks["ok"]
            runner.save()
        except Deadline as e:
            print(f"skipped the rest of {which}: {e}", flush=True)
            results.setdefault("skipped", []).append({"which": which, "why": str(e)})
        except Exception:  # noqa: BLE001 - one load failing must not lose the other dropout's rows
            import traceback

            traceback.print_exc()
            results.setdefault("failed", []).append({"which": which, "error": traceback.format_exc()[-4000:]})
        finally:
            model = init = None
            gc.collect()
            torch.cuda.empty_cache()
            runner.save()
    print(table([results]), flush=True)


# ---- the markdown table (no GPU, no Unsloth needed) ----


def _best(rows: list, setting: str, which: str | None = None) -> dict | None:
    pool = [
        r
        for r in rows
        if r["setting"] == setting
        and (which is None or r["which"] == which)
        and r.get("within_budget", r["peak_gib"] <= 12.0)
    ]
    return max(pool, key=lambda r: r["tokens_per_s"], default=None)


def table(docs: list[dict]) -> str:
    """'Training vs Unsloth' for BENCHMARKS.md from ours' JSON (bench/train_throughput.py) and Unsloth's."""
    rows, longest, card, cut = [], {}, "", set()
    for d in docs:
        card = card or f"{d.get('card', '?')}, {d.get('date', '?')}"
        budget = d.get("budget_gib", 12.0)
        for r in d.get("rows", []):
            rows.append(
                dict(
                    r,
                    within_budget=r.get("within_budget", r["peak_gib"] <= budget),
                    unsloth=r["which"].startswith("unsloth"),
                )
            )
        longest.update(d.get("longest_within_budget", {}))
        cut.update(d.get("long_search_cut_short", []))
        for k in ("longest_ours_within_budget", "longest_plain_within_budget"):
            if k in d:
                longest[k.split("_")[1]] = d[k]
    out = [
        f"Card: {card}. Budget 12 GiB; peak = torch.cuda.max_memory_allocated; tokens/s = median after warm-up.",
        "",
        "| setting | path | batch×len | checkpointing | tokens/s | step ms | peak GiB | first loss | loss (last 5) "
        "| checks |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(
        rows,
        key=lambda r: (
            ["seed", "throughput", "long"].index(r["setting"]) if r["setting"] in ("seed", "throughput", "long") else 9,
            r["unsloth"],
            r["which"],
            r["batch"],
            r["length"],
        ),
    ):
        mark = "**" if r.get("best_within_budget") or r.get("best_plain_within_budget") else ""
        ok = r.get("checks_ok")
        chk = ("unchecked" if ok is None else "ok" if ok else "FAILED") if r["unsloth"] else ""
        out.append(
            f"| {r['setting']} | {r['which']} | {r['batch']}×{r['length']} | {r.get('checkpointing')} | "
            f"{mark}{r['tokens_per_s']:.0f}{mark} | {1000 * r['step_s']:.0f} | {r['peak_gib']:.2f}"
            f"{'' if r['within_budget'] else ' (over)'} | {r['losses'][0]:.3f} | {r['loss_last5']:.3f} | "
            f"{chk} |"
        )
    out.append("")
    for setting in ("seed", "throughput"):
        ours = _best([r for r in rows if not r["unsloth"] and r["which"].startswith("ours")], setting)
        uns = _best([r for r in rows if r["unsloth"]], setting)
        if ours and uns:
            out.append(
                f"- {setting}: ours {ours['tokens_per_s']:.0f} tokens/s ({ours['batch']}×{ours['length']}, "
                f"{ours['peak_gib']:.2f} GiB) against Unsloth's best within budget, {uns['which']} "
                f"{uns['batch']}×{uns['length']}, {uns['tokens_per_s']:.0f} ({uns['peak_gib']:.2f} GiB): "
                f"**{ours['tokens_per_s'] / uns['tokens_per_s']:.2f}×** (target ≥ 1.5×)"
            )
    if longest:
        out.append(
            "- longest single sequence within budget: "
            + ", ".join(
                f"{k} {v}" + (" (search cut short by the time limit: at least this)" if k in cut else "")
                for k, v in longest.items()
            )
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", nargs="+", type=Path, metavar="JSON", help="print the markdown table and stop")
    ap.add_argument("--work", type=Path, default=Path("/tmp/aegis-bench"), help="train_throughput.py's --work")
    ap.add_argument("--form", choices=("llama", "fused"), default="llama")
    ap.add_argument("--targets", choices=("attn", "all"), default="attn", help="attn: the adapters ours trains")
    ap.add_argument("--dropouts", default="0,0.05")
    ap.add_argument("--settings", default="seed,throughput,long")
    ap.add_argument("--tp-batches", default="16,24,32", help="tried in order (see Runner.throughput)")
    ap.add_argument("--long-start", type=int, default=16384)
    ap.add_argument("--long-dropout", type=float, default=0.0, help="the load the long search runs on")
    ap.add_argument("--max-long", type=int, default=131072, help="Phi-3.5's context")
    ap.add_argument("--max-seq-length", type=int, default=2048, help="from_pretrained's, for seed and throughput")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per row, after --warmup")
    ap.add_argument("--long-warmup", type=int, default=0, help="the long rows are about memory: one step each")
    ap.add_argument("--long-steps", type=int, default=1)
    ap.add_argument("--budget-gib", type=float, default=12.0)
    ap.add_argument("--deadline", type=float, default=0.0, help="epoch seconds: start no row or load after it")
    ap.add_argument("--row-reserve-s", type=float, default=15.0, help="start no row with less time left")
    ap.add_argument("--load-reserve-s", type=float, default=60.0, help="start no load with less time left")
    ap.add_argument(
        "--load-budget-s", type=float, default=80.0, help="time kept per later load (loading, seed and throughput rows)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the short plan: dropout 0 only, throughput at 16, long 16384 and 32768, 2 + 3 steps",
    )
    ap.add_argument("--out", type=Path, default=Path("unsloth.json"))
    args = ap.parse_args(argv)
    if args.table:
        # a file a failed step never wrote is left out, so the rows that were measured still print
        print(table([json.loads(p.read_text()) for p in args.table if p.exists()]))
        return 0
    if args.quick:
        args.dropouts, args.tp_batches, args.warmup, args.steps = "0", "16", 2, 3
        args.long_start, args.max_long = 16384, 32768
    args.dropouts = [float(d) for d in args.dropouts.split(",") if d]
    args.tp_batches = [int(b) for b in args.tp_batches.split(",") if b]
    args.settings = set(args.settings.split(","))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
