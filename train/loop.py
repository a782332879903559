"""The training recipe, top to bottom: config -> base + LoRA + soul -> data -> updates on the α schedule ->
metrics and atomic checkpoints. Runs under accelerate: one process, or several with `accelerate launch`/`torchrun`."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from aegis import checkpoint, loading as model_mod, runs, schedule
from aegis.config import EMBEDDED, Config
from aegis.metrics import METRICS, JsonlSink, MetricLogger, ProgressSink

from . import data, graphs
from .loss import count_targets, masked_loss_sum


def soul_metadata(cfg: Config, step: int) -> dict:
    return {"step": step, "schedule": asdict(cfg.schedule), "alpha_mode": cfg.soul.alpha_mode,
            "init": cfg.soul.init, "base": cfg.model.base, "revision": cfg.model.revision,
            "quantization": cfg.model.quantization, "dtype": cfg.model.dtype}


def run(cfg: Config, run_dir: Path, resume: bool = False, log=print, progress: bool = True) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import set_peft_model_state_dict
    from transformers import AutoConfig, AutoTokenizer, get_scheduler

    run_dir = Path(run_dir)
    # cpu=True when there is no GPU, so `torchrun --nproc-per-node N` on CPUs forms a gloo group (accelerate only
    # looks for one on CPUs when told to, as `accelerate launch --cpu` does)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    set_seed(cfg.train.seed)
    sched = cfg.schedule

    # ---- resume point (decided before anything is written) ----
    start_ckpt = None
    if resume:
        if checkpoint.is_complete(run_dir / checkpoint.FINAL):
            log(f"{run_dir}: the run already finished ({checkpoint.FINAL}/ exists); nothing to resume")
            return run_dir / checkpoint.FINAL
        start_ckpt = checkpoint.latest(run_dir, resumable=True)
        if start_ckpt is None:
            log(f"{run_dir}: no complete checkpoint to resume from; starting from step 0")

    base_path = model_mod.resolve_base(cfg.model.base, cfg.model.revision)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = data.load(cfg.data.train, tokenizer, cfg.data.skip_bad_lines, log=log if main else lambda *_: None)
    stream = data.Stream(examples, cfg.train.max_length, cfg.train.seed, acc.process_index, acc.num_processes)

    base_config = AutoConfig.from_pretrained(base_path)
    mem = model_mod.memory_plan(cfg, base_config)
    use_graphs, why = graphs.decide(cfg.train.cuda_graphs, acc.device, acc.num_processes, mem.gradient_checkpointing,
                                    base_config)
    if acc.device.type == "cuda" and main:
        log(f"CUDA graphs {'on' if use_graphs else 'off'}: {why}"
            + ("; model.compile is skipped, the captured step replaces it" if use_graphs and cfg.model.compile else ""))
    model, soul = model_mod.build(cfg, base_path, acc.device, cfg.train.seed, log=log if main else (lambda *_: None),
                                  plan=mem, compile_layers=not use_graphs)
    # the adapter names its base as users would load it: the hub id or directory (the embedded model by its path)
    model.peft_config["default"].base_model_name_or_path = (str(base_path) if cfg.model.base == EMBEDDED
                                                             else cfg.model.base)
    learned_alpha = cfg.soul.alpha_mode == "learned"
    # A learned α is trainable from the start so DDP registers it; until the anneal ends the schedule overwrites
    # it and its gradient is dropped before each update.
    soul.alpha.requires_grad_(learned_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for the whole update instead of a dozen per parameter group (the step is launch-bound)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=acc.device.type == "cuda")
    lr_sched = get_scheduler(cfg.train.lr_schedule, optimizer, num_warmup_steps=cfg.train.lr_warmup_steps,
                             num_training_steps=sched.total_steps)
    model, optimizer = acc.prepare(model, optimizer)

    step = 0
    if start_ckpt is not None:
        inner = acc.unwrap_model(model)
        set_peft_model_state_dict(inner, checkpoint.adapter_weights(start_ckpt))
        checkpoint.load_soul_into(soul, start_ckpt)
        state = checkpoint.resume(start_ckpt, optimizer, lr_sched)
        step = state["step"]
        stream.restore(state["data"])
        accum = _rescale_accum(cfg, state, acc.num_processes)
        if accum != cfg.train.grad_accum:
            log(f"resumed on {acc.num_processes} process(es) instead of {state['world_size']}: gradient "
                f"accumulation {cfg.train.grad_accum} -> {accum} keeps the global batch of "
                f"{state['global_batch']} sequences")
            cfg.train.grad_accum = accum
        log(f"resumed from {start_ckpt} at step {step}")

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_config(run_dir, cfg)
    sink = JsonlSink(run_dir / METRICS)
    if main and step:
        sink.truncate_after(step)
    bar = ProgressSink(sched.total_steps, initial=step, enabled=progress and main)
    logger = MetricLogger([sink, bar] if main else [])

    def save(dest: Path) -> None:
        acc.wait_for_everyone()
        if main:
            checkpoint.save(dest, model=acc.unwrap_model(model), soul=soul, tokenizer=tokenizer,
                            optimizer=optimizer, scheduler=lr_sched, soul_meta=soul_metadata(cfg, step),
                            trainer_state={"step": step, "data": stream.state(), "world_size": acc.num_processes,
                                           "grad_accum": cfg.train.grad_accum,
                                           "global_batch": acc.num_processes * cfg.train.batch_size
                                           * cfg.train.grad_accum})
            checkpoint.prune(run_dir, cfg.train.keep_last)
        acc.wait_for_everyone()

    captured = (graphs.GraphedStep(model, soul, params, mem.micro_batch, cfg.train.max_length, acc.device)
                if use_graphs else None)

    anneal_end = sched.warmup_steps + sched.anneal_steps
    profiler = _profiler(run_dir) if main else None
    model.train()
    t_start = time.time()
    tokens_total = 0
    record: dict = {}
    while step < sched.total_steps:
        step += 1
        t0 = time.time()
        free_alpha = learned_alpha and step > anneal_end
        if not free_alpha:
            with torch.no_grad():
                soul.alpha.fill_(schedule.alpha_for_step(step, sched))
        seqs = [ex for b in stream.next_update(cfg.train.batch_size, cfg.train.grad_accum) for ex in b]
        micro = [data.collate(seqs[i:i + mem.micro_batch], tokenizer.pad_token_id, cfg.train.max_length)
                 for i in range(0, len(seqs), mem.micro_batch)]
        # counted on the host copies: no wait for the GPU inside the update
        n_targets = sum(count_targets(b["labels"]) for b in micro)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        if captured is not None:
            captured.begin()
        for i, batch in enumerate(micro):
            if captured is not None:
                loss_sum += captured.micro(batch, 1.0 / max(n_targets, 1))
                continue
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            sync = acc.no_sync(model) if (i < len(micro) - 1 and acc.num_processes > 1) else nullcontext()
            with sync:
                # no attention mask: padding is only ever on the right, where causal attention cannot see it
                loss = masked_loss_sum(model(input_ids=batch["input_ids"]).logits, batch["labels"])
                acc.backward(loss / max(n_targets, 1))
            loss_sum += loss.detach()
        if captured is not None:
            captured.end()
        if learned_alpha and not free_alpha:
            soul.alpha.grad = None  # AdamW skips it: the schedule owns α until the anneal ends
        if cfg.train.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(params, cfg.train.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params
                                                                    if p.grad is not None])))
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)  # a captured step re-attaches its fixed gradients in begin()

        counts = torch.tensor([n_targets, tokens], dtype=torch.float64, device=acc.device)
        totals = acc.reduce(torch.cat([loss_sum.reshape(1), counts]), reduction="sum").tolist()
        dt = time.time() - t0
        tokens_total += int(totals[2])
        health = soul.health()
        record = {"step": step, "loss": totals[0] / max(totals[1], 1), "lr": lr_sched.get_last_lr()[0],
                  "alpha": health["alpha"], "gate": health["gate"], "phase": schedule.phase(health["alpha"], sched),
                  "ortho_error": health["ortho_error"], "det_min": health["det_min"],
                  "det_max": health["det_max"], "rotation_norm": health["rotation_norm"], "grad_norm": grad_norm,
                  "tokens": int(totals[2]), "tokens_per_s": totals[2] / dt, "elapsed_s": time.time() - t_start}
        if torch.cuda.is_available():
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        logger.log(record)
        if profiler is not None:
            profiler.step()
        if step % cfg.train.save_steps == 0:
            save(run_dir / checkpoint.CHECKPOINTS / f"step_{step}")
    if captured is not None:
        captured.close()
    save(run_dir / checkpoint.FINAL)
    logger.close()
    if profiler is not None:
        profiler.stop()
    if main:
        summary = {"steps": step, "final_loss": record.get("loss"), "alpha": record.get("alpha"),
                   "gate": record.get("gate"), "phase": record.get("phase"), "ortho_error": record.get("ortho_error"),
                   "tokens_this_session": tokens_total, "seconds_this_session": round(time.time() - t_start, 1),
                   "final": str(run_dir / checkpoint.FINAL)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log("done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in summary.items()))
    return run_dir / checkpoint.FINAL


def _rescale_accum(cfg: Config, state: dict, world: int) -> int:
    """Gradient accumulation that keeps the checkpoint's global batch (processes x micro-batch x accumulation)."""
    glob = state.get("global_batch", world * cfg.train.batch_size * cfg.train.grad_accum)
    if world * cfg.train.batch_size * cfg.train.grad_accum == glob:
        return cfg.train.grad_accum
    accum, rem = divmod(glob, world * cfg.train.batch_size)
    if rem or accum < 1:
        raise checkpoint.CheckpointError(
            f"resume: the checkpoint's global batch of {glob} sequences cannot be kept with {world} process(es) x "
            f"train.batch_size {cfg.train.batch_size}; choose a batch size that divides it")
    return accum


def _profiler(run_dir: Path):
    """AEGIS_PROFILE=N: profile N updates after 3 warm-up updates; the op table goes to RUN_DIR/profile.txt."""
    import os
    n = int(os.environ.get("AEGIS_PROFILE", "0"))
    if n <= 0:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule as prof_schedule

    def write(prof) -> None:
        avg = prof.key_averages()
        keys = ["self_cpu_time_total"] + (["self_device_time_total"] if torch.cuda.is_available() else [])
        (run_dir / "profile.txt").write_text("\n\n".join(avg.table(sort_by=k, row_limit=30) for k in keys))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, schedule=prof_schedule(wait=0, warmup=3, active=n, repeat=1),
                   on_trace_ready=write)
    prof.start()
    return prof
