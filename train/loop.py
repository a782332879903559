"""The training recipe: config -> base + LoRA + soul -> data -> updates on the α schedule -> metrics and atomic,
checksummed checkpoints. Runs under accelerate: one process, or several with `accelerate launch`/`torchrun`.

`run` is the recipe itself; each of its steps is a method of `Recipe` (one update's, of its base class `Update` in
train/update.py), and where the run stands is one `Progress` record. A non-finite loss, gradient norm or weight
stops the run at the step where it appears, before anything of that step is saved."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import set_peft_model_state_dict
from transformers import AutoConfig, AutoTokenizer, get_scheduler

from aegis import checkpoint, loading as model_mod, memory, runs, soul as soul_mod
from aegis.config import EMBEDDED, Config, to_dict
from aegis.errors import no_space, out_of_room
from aegis.metrics import METRICS, JsonlSink, MetricLogger, ProgressSink, read as read_metrics

from . import batches, data, graphs, profile, rundir, trackers
from .progress import Progress, soul_metadata, write_summary
from .update import Update


def run(
    cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False, log=print, progress: bool = True
) -> Path:
    """Train `cfg` into `run_dir`; returns the final checkpoint. `resume` continues the run there from its newest
    checkpoint that verifies; `overwrite` deletes a run there first; without either, a run there is an error."""
    recipe = Recipe(cfg, Path(run_dir), log)
    try:
        start = recipe.check(resume, overwrite)  # takes the directory's lock (train/rundir.py)
        if start is not None and start.name == checkpoint.FINAL:
            recipe.log(f"{run_dir}: the run already finished ({checkpoint.FINAL}/ verifies); nothing to resume")
            return start
        recipe.set_up()
        if start is not None:
            recipe.restore(start)
        recipe.begin(show_progress=progress)
        with interrupts() as seen:
            while recipe.progress.step < cfg.schedule.total_steps:
                recipe.record(recipe.step())
                if recipe.progress.step % cfg.train.save_steps == 0:
                    recipe.save(recipe.run_dir / checkpoint.CHECKPOINTS / f"step_{recipe.progress.step}")
                if seen:  # a Ctrl-C a library caught mid-call still stops the run, here
                    raise KeyboardInterrupt
        recipe.finish()
    finally:
        if hasattr(recipe, "logger"):  # a run stopped early still closes its trackers: each keeps what it was given
            recipe.logger.close()
        rundir.unlock(recipe.run_dir)
    return recipe.run_dir / checkpoint.FINAL


@contextlib.contextmanager
def interrupts():
    """Ctrl-C is raised as ever and also remembered: a tracker's library that catches it in the middle of a call
    (MLflow's store was seen to, while it wrote a metric) cannot make the run go on past the step."""
    seen: list[int] = []

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: signals are not this code's to handle
        yield seen
        return
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


class Recipe(Update):
    """The steps of one run in the order `run` calls them: check, set_up, restore, begin, then step/record/save
    until the schedule ends, and finish."""

    def __init__(self, cfg: Config, run_dir: Path, log=print):
        self.cfg, self.run_dir = cfg, run_dir
        # cpu=True when there is no GPU, so `torchrun --nproc-per-node N` on CPUs forms a gloo group (accelerate only
        # looks for one on CPUs when told to, as `accelerate launch --cpu` does)
        self.acc = Accelerator(cpu=not torch.cuda.is_available())
        self.main = self.acc.is_main_process
        self.log = log if self.main else (lambda *_: None)
        self.progress = Progress()
        set_seed(cfg.train.seed)

    def check(self, resume: bool, overwrite: bool) -> Path | None:
        """The run directory's rules and, on resume, the checkpoint to start from: all before any model loads."""
        rundir.prepare(self.run_dir, resume, overwrite, self.main, self.log)
        trackers.check(self.cfg.train.report_to)
        if not resume:
            return None
        start, _ = rundir.resume_point(self.run_dir, self.cfg, self.acc.num_processes, self.log)
        return start

    # ---- set up -----------------------------------------------------------------------------------------------

    def set_up(self) -> None:
        """The memory plan (from the base's config alone), tokenizer and data, then base + LoRA + soul, then
        optimizer and LR schedule: a step that cannot fit, or bad data, is refused before any weights load."""
        base_path = model_mod.resolve_base(self.cfg.model.base, self.cfg.model.revision)
        self.base_config = AutoConfig.from_pretrained(base_path)
        self.mem = memory.plan_for(self.cfg, self.base_config, self.acc.device, self.log)
        self._set_up_data(base_path)
        self._set_up_model(base_path)
        self._set_up_optimizer()

    def _set_up_data(self, base_path: Path) -> None:
        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        examples = data.load(cfg.data.train, self.tokenizer, cfg.data.skip_bad_lines, log=self.log)
        self.packing = batches.packing_mode(cfg.data.packing, examples, self.mem.tiled_attention)
        self.log(f"data.packing: {self.packing}")
        self.stream = batches.Stream(
            examples,
            cfg.train.max_length,
            cfg.train.seed,
            self.acc.process_index,
            self.acc.num_processes,
            documents=self.packing == "documents",
        )

    def _set_up_model(self, base_path: Path) -> None:
        cfg, acc = self.cfg, self.acc
        self.use_graphs, why = graphs.decide(
            cfg.train.cuda_graphs, acc.device, acc.num_processes, self.mem.gradient_checkpointing, self.base_config
        )
        if acc.device.type == "cuda":
            self.log(f"CUDA graphs {'on' if self.use_graphs else 'off'}: {why}")
        self.model, self.soul = model_mod.build(cfg, base_path, acc.device, cfg.train.seed, log=self.log, plan=self.mem)
        self.head = soul_mod.head_of(self.model)
        # the adapter names its base as users would load it: the hub id or directory (the embedded model by its path)
        self.model.peft_config["default"].base_model_name_or_path = (
            str(base_path) if cfg.model.base == EMBEDDED else cfg.model.base
        )
        # A learned α is trainable from the start so DDP registers it; until the anneal ends the schedule overwrites
        # it and its gradient is dropped before each update.
        self.learned_alpha = cfg.soul.alpha_mode == "learned"
        self.soul.alpha.requires_grad_(self.learned_alpha)

    def _set_up_optimizer(self) -> None:
        cfg, acc = self.cfg, self.acc
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for the whole update instead of a dozen per parameter group (the step is launch-bound)
        optimizer = torch.optim.AdamW(
            self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=acc.device.type == "cuda"
        )
        self.lr_sched = get_scheduler(
            cfg.train.lr_schedule,
            optimizer,
            num_warmup_steps=cfg.train.lr_warmup_steps,
            num_training_steps=cfg.schedule.total_steps,
        )
        self.model, self.optimizer = acc.prepare(self.model, optimizer)

    # ---- restore and begin ------------------------------------------------------------------------------------

    def restore(self, ckpt: Path) -> None:
        """Adapter, soul, optimizer, LR schedule, RNG and data position from `ckpt`; the global batch is kept."""
        set_peft_model_state_dict(self.acc.unwrap_model(self.model), checkpoint.adapter_weights(ckpt))
        checkpoint.load_soul_into(self.soul, ckpt)
        state = checkpoint.resume(ckpt, self.optimizer, self.lr_sched)
        self.progress.step = state["step"]
        self.stream.restore(state["data"])
        accum = rundir.accum_for(self.cfg, state, self.acc.num_processes)
        if accum != self.cfg.train.grad_accum:
            self.log(
                f"resumed on {self.acc.num_processes} process(es) instead of {state['world_size']}: gradient "
                f"accumulation {self.cfg.train.grad_accum} -> {accum} keeps the global batch of "
                f"{state['global_batch']} sequences"
            )
            self.cfg.train.grad_accum = accum
        self.log(f"resumed from {ckpt} at step {self.progress.step}")

    def begin(self, show_progress: bool = True) -> None:
        """config.toml, metrics.jsonl cut back to the step we start from (each step is written once, whenever the
        run was killed), the progress bar, the captured step; then train mode."""
        sink = JsonlSink(self.run_dir / METRICS)
        views = []
        if self.main:
            runs.write_config(self.run_dir, self.cfg)
            # the trackers a resume continues already have what metrics.jsonl held past the checkpoint
            logged = max((r["step"] for r in read_metrics(self.run_dir)), default=0)
            views = trackers.start(self.cfg, self.run_dir, logged, warn=self.log)
            sink.truncate_after(self.progress.step)
            # what summary.json reports if this session takes no step (a finished run whose final/ failed its
            # digests is resumed from its last step checkpoint and only writes final/ again)
            self.progress.last = next(
                (r for r in reversed(read_metrics(self.run_dir)) if r["step"] == self.progress.step), {}
            )
        bar = ProgressSink(
            self.cfg.schedule.total_steps, initial=self.progress.step, enabled=show_progress and self.main
        )
        self.logger = MetricLogger([sink, bar, *views] if self.main else [])
        self.captured = (
            graphs.GraphedStep(
                self.model,
                self.soul,
                self.params,
                self.mem.micro_batch,
                self.cfg.train.max_length,
                self.acc.device,
                documents=self.stream.documents,
            )
            if self.use_graphs
            else None
        )
        self.profiler = profile.start(self.run_dir) if self.main else None
        self.progress.started = time.time()
        self.model.train()

    # ---- record and save --------------------------------------------------------------------------------------

    def record(self, rec: dict) -> None:
        self.progress.last = rec
        self.progress.tokens += rec["tokens"]
        try:
            self.logger.log(rec)
        except OSError as e:  # a line cut short is dropped by every reader, and by the resume
            if out_of_room(e):
                raise no_space(self.run_dir / METRICS, e, then="continue with --resume") from None
            raise
        if self.profiler is not None:
            self.profiler.step()

    def save(self, dest: Path) -> None:
        """A checkpoint of the current step: the main process writes it, every process waits for it."""
        if not bool(torch.stack([p.isfinite().all() for p in self.params]).all()):
            self._stop("a weight is no longer finite")
        acc, cfg, step = self.acc, self.cfg, self.progress.step
        acc.wait_for_everyone()
        if self.main:
            state = {
                "step": step,
                "data": self.stream.state(),
                "world_size": acc.num_processes,
                "grad_accum": cfg.train.grad_accum,
                "config": to_dict(cfg),
                "global_batch": acc.num_processes * cfg.train.batch_size * cfg.train.grad_accum,
            }
            checkpoint.save(
                dest,
                model=acc.unwrap_model(self.model),
                soul=self.soul,
                tokenizer=self.tokenizer,
                optimizer=self.optimizer,
                scheduler=self.lr_sched,
                soul_meta=soul_metadata(cfg, step),
                trainer_state=state,
            )
            checkpoint.prune(self.run_dir, cfg.train.keep_last)
        acc.wait_for_everyone()

    def finish(self) -> None:
        """final/, then summary.json and the closing line."""
        if self.captured is not None:
            self.captured.close()
        self.save(self.run_dir / checkpoint.FINAL)
        self.logger.close()
        if self.profiler is not None:
            self.profiler.stop()
        if not self.main:
            return
        summary = write_summary(self.run_dir, self.progress, self.soul, self.cfg)
        self.log(
            "done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
        )
