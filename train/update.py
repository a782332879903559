"""One update of the training recipe: α from the schedule, forward + backward over the micro-batches, the clipped
gradient norm, the finiteness checks, then AdamW. `Update` is a base class of `Recipe` (train/loop.py), whose set-up
gives it the model, soul, optimizer, data stream and memory plan it reads; a value that is NaN or infinite stops the
run with `NonFiniteError` before anything of its step is saved."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch

from aegis import checkpoint, schedule

from . import batches
from .loss import count_targets, micro_loss
from .progress import metrics_record
from .rundir import RunError


class NonFiniteError(RunError):
    """A loss, gradient norm or weight that is NaN or infinite; the message names the step."""


class Update:
    """`Recipe.step` and the helpers it calls. They read what `Recipe` sets up (cfg, progress, acc, model, head,
    soul, params, optimizer, lr_sched, stream, mem, tokenizer, captured, learned_alpha); `_stop` serves `Recipe.save`
    too."""

    def step(self) -> dict:
        """One update: α from the schedule, forward + backward over the micro-batches, clip, check, AdamW.
        Returns its metrics record."""
        p, cfg = self.progress, self.cfg
        p.step += 1
        t0 = time.time()
        anneal_end = cfg.schedule.warmup_steps + cfg.schedule.anneal_steps
        free_alpha = self.learned_alpha and p.step > anneal_end
        if not free_alpha:
            with torch.no_grad():
                self.soul.alpha.fill_(schedule.alpha_for_step(p.step, cfg.schedule))
        seqs = [ex for b in self.stream.next_update(cfg.train.batch_size, cfg.train.grad_accum) for ex in b]
        micro = [
            batches.collate(seqs[i : i + self.mem.micro_batch], self.tokenizer.pad_token_id, cfg.train.max_length)
            for i in range(0, len(seqs), self.mem.micro_batch)
        ]
        loss_sum, n_targets = self._forward_backward(micro)
        if self.learned_alpha and not free_alpha:
            self.soul.alpha.grad = None  # AdamW skips it: the schedule owns α until the anneal ends
        grad_norm = self._grad_norm()
        # counted on the host copies: no wait for the GPU inside the update
        counts = torch.tensor(
            [n_targets, sum(int(b["attention_mask"].sum()) for b in micro)], dtype=torch.float64, device=self.acc.device
        )
        totals = self.acc.reduce(torch.cat([loss_sum.reshape(1), counts]), reduction="sum")
        loss_total, targets, tokens = totals.tolist()
        loss = loss_total / max(targets, 1)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._stop(f"the loss is {loss} and the gradient norm {grad_norm}")
        self.optimizer.step()
        self.lr_sched.step()
        self.optimizer.zero_grad(set_to_none=True)  # a captured step re-attaches its fixed gradients in begin()
        rec = metrics_record(
            self.progress,
            self.soul,
            cfg,
            self.lr_sched.get_last_lr()[0],
            loss,
            grad_norm,
            int(tokens),
            time.time() - t0,
        )
        broken = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
        if broken:  # the soul's health is measured on the updated weights: NaN there means the update broke them
            self._stop(f"the update left {', '.join(broken)} non-finite")
        return rec

    def _forward_backward(self, micro: list[dict]) -> tuple[torch.Tensor, int]:
        """Gradients of the update's mean loss per target token, accumulated over its micro-batches (DDP syncs on
        the last); returns the loss summed over target tokens and their number, this process's share."""
        acc, captured = self.acc, self.captured
        n_targets = sum(count_targets(b["labels"]) for b in micro)
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        if captured is not None:
            captured.begin()
        for i, batch in enumerate(micro):
            if captured is not None:
                loss_sum += captured.micro(batch, 1.0 / max(n_targets, 1))
                continue
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            sync = acc.no_sync(self.model) if (i < len(micro) - 1 and acc.num_processes > 1) else nullcontext()
            with sync:
                loss = micro_loss(self.model, self.head, batch, self.mem.offload)
                acc.backward(loss / max(n_targets, 1))
            loss_sum += loss.detach()
        if captured is not None:
            captured.end()
        return loss_sum, n_targets

    def _grad_norm(self) -> float:
        """The gradients' global norm, after clipping them to train.max_grad_norm when it is set."""
        if self.cfg.train.max_grad_norm > 0:
            return float(self.acc.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))

    def _stop(self, what: str) -> None:
        newest = checkpoint.latest(self.run_dir)
        raise NonFiniteError(
            f"step {self.progress.step}: {what}; the run stops here and nothing of this step is "
            f"saved (newest checkpoint: {newest or 'none'}); lower train.lr or check the data"
        )
