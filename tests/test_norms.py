"""RMSNorm through torch's fused kernel (aegis/norms.py): the training build's norms give the loss and gradients of
transformers' own, and a norm class that computes something else (Gemma's 1 + weight) keeps its forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aegis import loading as model_mod
from aegis.config import build
from aegis.forwards import given
from aegis.norms import _fused, fuse_rms_norms
from support.training import assert_grads_close, loss_and_grads, restore_forwards

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_fused_norms_give_the_same_loss_and_gradients(tiny_path, device):
    gpu = ["model.quantization=nf4", "lora.dropout=0.0"] if device == "cuda" else ["model.quantization=none"]
    model, soul = model_mod.build(build({}, ["model.base=embedded", *gpu]), tiny_path, torch.device(device), seed=0)
    with torch.no_grad():
        soul.alpha.fill_(1.0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
            if "layernorm" in n or n.endswith("norm.weight"):
                p.normal_(1.0, 0.2)  # norms that are not all ones, so a lost weight shows
    model.train()
    ids = torch.randint(5, 3000, (2, 64), generator=torch.Generator().manual_seed(6)).to(device)
    fused, got = loss_and_grads(model, ids)
    assert restore_forwards(model, _fused) == 2 * model.get_base_model().config.num_hidden_layers + 1
    own, want = loss_and_grads(model, ids)
    cpu = device == "cpu"  # float32; on the GPU bf16, where the fused kernel rounds once instead of twice
    torch.testing.assert_close(fused, own, rtol=1e-5 if cpu else 1e-2, atol=1e-4 if cpu else 1e-2)
    assert got.keys() == want.keys() and any("lora_B" in n for n in got)
    if cpu:
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    else:
        assert_grads_close(got, want, rel=3e-2)


class PlainRMSNorm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class OnePlusRMSNorm(PlainRMSNorm):  # Gemma's form: scaled by 1 + weight
    def forward(self, x):
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_only_norms_that_compute_rmsnorm_are_switched():
    model = nn.ModuleList([PlainRMSNorm(16), OnePlusRMSNorm(16), PlainRMSNorm(16)])
    with torch.no_grad():
        for norm in model:
            norm.weight.normal_(0, 1)
    x = torch.randn(4, 16)
    before = [norm(x) for norm in model]
    assert fuse_rms_norms(model) == 2 and fuse_rms_norms(model) == 0  # once
    assert [given(n, _fused) for n in model] == [True, False, True]
    for norm, want in zip(model, before):
        torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-6)
