"""Held-out loss and perplexity of a checkpoint, of the same checkpoint with the soul's gate shut, and of the base.

    python -m train.eval --checkpoint RUN_DIR/final [--data FILE ...] [--json] [--out FILE]

The three rows separate what each part did: `base` is the base model alone (adapter disabled, gate shut: the
same weights, in the same quantization, that the adapter was trained on); `gate_shut` is base + LoRA with g = 0;
`checkpoint` is base + LoRA + soul as trained. With mix = "interpolate" a shut gate is exactly the base head.

Loss is token-weighted: the sum of next-token cross-entropy over every labelled token of the data, divided by
their number (not a mean of per-example means). Each example is scored on its own (no packing across examples,
so no example is predicted from another's text); one longer than max_length is cut into windows of max_length.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from aegis import atomic, checkpoint, cli, runs
from aegis.cli import setting
from aegis.errors import AegisError
from aegis.loading import load_checkpoint

from . import batches, data, trackers
from .loss import count_targets, masked_loss_sum

PROG = "python -m train.eval"
VARIANTS = ("checkpoint", "gate_shut", "base")
DEFAULT_MAX_LENGTH = 512


def windows(examples: list[data.Example], max_length: int) -> list[data.Example]:
    """Each example cut into windows of at most max_length tokens; windows with nothing to predict are dropped."""
    out = []
    for ex in examples:
        for i in range(0, len(ex.input_ids), max_length):
            w = data.Example(ex.input_ids[i : i + max_length], ex.labels[i : i + max_length])
            if any(t != data.IGNORE for t in w.labels[1:]):
                out.append(w)
    return out


@contextmanager
def gate_shut(soul):
    """g = sigmoid(-inf) = 0 exactly, for the duration; alpha is restored afterwards."""
    saved = soul.alpha.detach().clone()
    with torch.no_grad():
        soul.alpha.fill_(-math.inf)
    try:
        yield
    finally:
        with torch.no_grad():
            soul.alpha.copy_(saved)


@torch.no_grad()
def loss_over(model, seqs: list[data.Example], pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """(sum of token losses, number of labelled tokens) over `seqs`, batched by similar length."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = batches.collate([seqs[i] for i in order[start : start + batch_size]], pad_id)
        count += count_targets(batch["labels"])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += float(masked_loss_sum(logits, batch["labels"]))
    return total, count


def figures(loss_sum: float, count: int) -> dict:
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def default_sources(ckpt: Path) -> list[str]:
    """The run's data.eval, from the config.toml of the run that holds `ckpt`."""
    run_dir = runs.run_of(ckpt)
    sources = runs.read_config(run_dir).data.eval if run_dir else []
    if not sources:
        where = f"{run_dir / runs.CONFIG} has no data.eval" if run_dir else f"no {runs.CONFIG} beside it"
        raise data.DataError(f"{ckpt}: no evaluation data given (--data) and {where}")
    return list(sources)


class Evaluator:
    """One loaded checkpoint, scored on as many data sets as asked (the model is loaded once)."""

    def __init__(
        self,
        ckpt: Path,
        base: str | None = None,
        quantization: str | None = None,
        max_length: int | None = None,
        batch_size: int = 8,
    ):
        self.ckpt = Path(ckpt)
        if not self.ckpt.is_dir():
            raise checkpoint.CheckpointError(f"{self.ckpt}: no such checkpoint directory")
        run_dir = runs.run_of(self.ckpt)
        self.max_length = max_length or (runs.read_config(run_dir).train.max_length if run_dir else DEFAULT_MAX_LENGTH)
        self.batch_size = batch_size
        self.model, self.soul, self.tokenizer, self.meta = load_checkpoint(
            self.ckpt, base=base, quantization=quantization
        )
        self.quantization = quantization or self.meta.get("quantization")
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run(self, sources: list[str], variants=VARIANTS, log=print) -> dict:
        """The figures for each variant as a dict (what --json prints)."""
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
        seqs = windows(data.load(list(sources), self.tokenizer, log=log), self.max_length)
        soul = self.soul
        result = {
            "checkpoint": str(self.ckpt),
            "data": list(sources),
            "max_length": self.max_length,
            "base": self.meta.get("base"),
            "quantization": self.quantization,
            "step": self.meta.get("step"),
            "mix": soul.mix,
            "gate": float(soul.gate()),
            "alpha": float(soul.alpha),
            "results": {},
        }
        for variant in variants:
            adapter_off = self.model.disable_adapter() if variant == "base" else nullcontext()
            shut = gate_shut(soul) if variant in ("base", "gate_shut") else nullcontext()
            with adapter_off, shut:
                result["results"][variant] = figures(*loss_over(self.model, seqs, self.pad_id, self.batch_size))
        res = result["results"]
        if "base" in res:
            for variant in ("checkpoint", "gate_shut"):
                if variant in res:
                    res[variant]["ratio_to_base"] = res[variant]["perplexity"] / res["base"]["perplexity"]
        return result


def evaluate(
    ckpt: Path,
    sources: list[str] | None = None,
    variants=VARIANTS,
    max_length: int | None = None,
    base: str | None = None,
    quantization: str | None = None,
    batch_size: int = 8,
    log=print,
) -> dict:
    """Load `ckpt` and score it on `sources` (default: the run's data.eval)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise checkpoint.CheckpointError(f"{ckpt}: no such checkpoint directory")
    sources = list(sources) if sources else default_sources(ckpt)
    for source in sources:  # a missing file should fail before the model is loaded
        data.resolve(source)
    return Evaluator(ckpt, base, quantization, max_length, batch_size).run(sources, variants, log)


def table(result: dict) -> str:
    rows = [
        f"{result['checkpoint']} (step {result['step']}, gate {result['gate']:.4f}, mix {result['mix']}) on "
        f"{', '.join(result['data'])}: {next(iter(result['results'].values()))['tokens']} labelled tokens",
        f"{'':<12}{'loss':>10}{'perplexity':>13}{'vs base':>10}",
    ]
    labels = {"checkpoint": "checkpoint", "gate_shut": "gate shut", "base": "base"}
    for variant, r in result["results"].items():
        ratio = f"{r['ratio_to_base']:.4f}" if "ratio_to_base" in r else ""
        rows.append(f"{labels[variant]:<12}{r['loss']:>10.4f}{r['perplexity']:>13.3f}{ratio:>10}")
    return "\n".join(rows)


@dataclass
class Args:
    """Held-out loss and perplexity of a checkpoint, of it with the gate shut (g = 0), and of the base alone."""

    checkpoint: Path = setting(
        help="RUN_DIR/final or RUN_DIR/checkpoints/step_N", metavar="DIR", env="AEGIS_CHECKPOINT", required=True
    )
    base: bool = setting(False, "evaluate the base alone only (no adapter, no soul)")
    base_model: str | None = setting(None, "use this base instead of the one the checkpoint names", metavar="NAME")
    data: list[str] = setting(
        None,
        "evaluation data (file, directory, embedded:NAME); default: the run's data.eval from its config.toml",
        metavar="SOURCE",
        repeat=True,
    )
    max_length: int | None = setting(
        None, "window length (default: the run's train.max_length)", parse=cli.bounded(int, 2)
    )
    batch_size: int = setting(8, "examples scored at once", parse=cli.bounded(int, 1))
    json: bool = setting(False, "print the figures as JSON")
    out: Path | None = setting(None, "also write the JSON to this file", metavar="FILE")


def report(args: Args) -> None:
    variants = ("base",) if args.base else VARIANTS
    try:
        result = evaluate(
            args.checkpoint,
            args.data,
            variants,
            args.max_length,
            base=args.base_model,
            batch_size=args.batch_size,
            log=lambda m: print(m, file=sys.stderr),
        )
    except AegisError as e:  # the checkpoint, base or data the user named
        raise cli.UsageError(str(e).splitlines()) from None
    trackers.log_eval(args.checkpoint, result, warn=lambda m: print(m, file=sys.stderr))
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        atomic.write_text(args.out, text + "\n")
    print(text if args.json else table(result))


def main(argv: list[str] | None = None) -> int:
    return cli.main(lambda: report(cli.parse(Args, sys.argv[1:] if argv is None else argv, prog=PROG)))


if __name__ == "__main__":
    sys.exit(main())
