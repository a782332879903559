"""GPU-only checks of the training path (run on a CUDA machine: `pytest -m gpu`)."""

import pytest
import torch

from aegis import checkpoint, metrics
from conftest import SHORT, train_cli

pytestmark = pytest.mark.gpu


def test_nf4_training_on_cuda_uses_bf16_and_reports_memory(tiny_path, tmp_path):
    run = tmp_path / "run"
    train_cli(run, *SHORT)
    recs = metrics.read(run)
    assert len(recs) == 12 and all(r["gpu_mem_gib"] > 0 for r in recs)
    assert recs[-1]["gate"] == pytest.approx(0.8345, abs=1e-4) and recs[-1]["ortho_error"] < 1e-5
    _, meta = checkpoint.read_soul(run / "final")
    assert meta["quantization"] == "nf4"
    from aegis.loading import load_checkpoint

    model, soul, _, _ = load_checkpoint(run / "final")
    qkv = model.get_base_model().model.layers[0].self_attn.qkv_proj.base_layer
    assert qkv.weight.device.type == "cuda" and qkv.compute_dtype == torch.bfloat16


def test_fold_on_cuda_matches(tiny_path):
    from torch import nn

    from aegis.soul import Soul, SoulHead

    head = nn.Linear(128, 4032, bias=False, device="cuda", dtype=torch.bfloat16)
    soul = Soul(128, init="random", alpha=1.618).cuda()
    h = torch.randn(2, 9, 128, device="cuda")
    logits = SoulHead(head.float(), soul)(h)
    folded = h @ soul.fold(head.weight).T
    assert (folded - logits).abs().max() / logits.abs().max() < 1e-4
