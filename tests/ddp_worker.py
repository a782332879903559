"""Run under torchrun by tests/test_distributed.py: trains through train.loop.run, then checks across ranks that
every process ends with the same soul. Writes RUN_DIR/rank_check.json from rank 0."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from aegis import loading as model_mod
from aegis.config import load
from train.loop import run

souls = []
_build = model_mod.build


def build_and_keep(*args, **kwargs):
    model, soul = _build(*args, **kwargs)
    souls.append(soul)
    return model, soul


model_mod.build = build_and_keep  # observe the soul this process trains; nothing else changes

config, run_dir, *overrides = sys.argv[1:]
run(load(config, overrides), Path(run_dir), progress=False)
mine = torch.cat([souls[0].generators.detach().flatten(), souls[0].alpha.detach().reshape(1)])
gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, mine)
if dist.get_rank() == 0:
    (Path(run_dir) / "rank_check.json").write_text(
        json.dumps(
            {
                "world": dist.get_world_size(),
                "max_diff": max(float((g - gathered[0]).abs().max()) for g in gathered),
                "moved": float(gathered[0][:-1].abs().max()),
            }
        )
    )
dist.barrier()
dist.destroy_process_group()  # a clean teardown: an undestroyed gloo group can abort the process at exit
