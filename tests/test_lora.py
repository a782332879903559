"""LoRA's training forward (aegis/lora.py): PEFT's result and gradients, in the compute dtype, and PEFT's own forward
wherever the layer is in any other state. The same check runs on the GPU (marked gpu) over the 4-bit base in bf16."""

from __future__ import annotations

import pytest
import torch

from aegis import loading as model_mod
from aegis.config import build
from aegis.lora import _forward, compute_dtype_lora
from support.training import assert_grads_close, loss_and_grads, restore_forwards

# cpu: float32 over a plain base; cpu-nf4: float32 over bitsandbytes' 4-bit layers (PEFT's other LoRA class);
# cuda: the 4-bit base in bf16, as training runs there
DEVICES = [pytest.param("cpu"), pytest.param("cpu-nf4"), pytest.param("cuda", marks=pytest.mark.gpu)]
TARGETS = 'lora.target_modules=["qkv_proj","o_proj","gate_up_proj","down_proj"]'


def _model(tiny_path, device: str, *sets: str):
    kind = {
        "cuda": ["model.quantization=nf4", "lora.dropout=0.0"],
        "cpu": ["model.quantization=none"],
        "cpu-nf4": ["model.quantization=nf4", "model.dtype=float32", "train.dequantized_base=false"],
    }[device]
    model, soul = model_mod.build(
        build({}, ["model.base=embedded", TARGETS, *kind, *sets]), tiny_path, torch.device(device.split("-")[0]), seed=0
    )
    with torch.no_grad():
        soul.alpha.fill_(1.0)
        soul.generators.normal_(0, 0.1)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero, where a wrong scaling or a missing product would not show
                p.normal_(0, 0.02)
    model.train()
    return model


def _peft(model) -> int:
    """Back to PEFT's own forward on every layer that has ours."""
    return restore_forwards(model, _forward)


@pytest.mark.parametrize("device", DEVICES)
def test_training_forward_gives_peft_loss_and_gradients(tiny_path, device):
    """Every adapted layer of a training build has the compute-dtype forward; the loss and every LoRA and soul
    gradient equal those of PEFT's own forward (LoRA dropout on, on the CPU)."""
    model = _model(tiny_path, device)
    ids = torch.randint(5, 3000, (2, 64), generator=torch.Generator().manual_seed(4)).to(device.split("-")[0])
    ours, got = loss_and_grads(model, ids)
    layers = model.get_base_model().config.num_hidden_layers
    assert _peft(model) == 4 * layers  # the build gave all of them ours
    peft, want = loss_and_grads(model, ids)
    cpu = device != "cuda"  # float32 there: equal to rounding; bf16 on the GPU, where PEFT computes them in float32
    torch.testing.assert_close(ours, peft, rtol=1e-5 if cpu else 1e-2, atol=1e-4 if cpu else 1e-2)
    assert got.keys() == want.keys() and sum("lora_B" in n for n in got) == 4 * layers and any("soul" in n for n in got)
    if cpu:
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    else:
        assert_grads_close(got, want, rel=3e-2)


def test_in_bf16_the_adapter_keeps_no_float32_activations(tiny_path):
    """What it is for: computing in bf16, PEFT's adapter saves float32 copies of activations for the backward pass;
    ours saves none (the only float32 tensors it keeps are the adapter weights themselves)."""
    model = _model(tiny_path, "cpu", "model.dtype=bfloat16", "lora.dropout=0.0")
    layer = model.get_base_model().model.layers[0].self_attn.qkv_proj
    x = torch.randn(1, 96, layer.in_features, dtype=torch.bfloat16, requires_grad=True)

    def float32_activations() -> tuple[int, torch.Tensor]:
        seen = []

        def pack(t):
            if t.dtype == torch.float32 and t.dim() >= 2 and t.shape[0] * (t.shape[1] if t.dim() > 2 else 1) >= 96:
                seen.append(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(x)
        return len(seen), out

    ours, got = float32_activations()
    _peft(model)
    peft, want = float32_activations()
    assert ours == 0 and peft > 0, (ours, peft)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_any_other_state_runs_peft_forward(tiny_path):
    """Adapters disabled (the base alone) or merged into the weights: PEFT's own forward decides."""
    model = _model(tiny_path, "cpu")
    model.eval()
    ids = torch.randint(5, 3000, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        layer = model.get_base_model().model.layers[0].self_attn.qkv_proj
        x = torch.randn(1, 8, layer.in_features)
        before = layer(x)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
    assert (adapted - base).abs().max() > 1e-3  # the adapters do something, and disabling them removes it
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-5)  # merged: the adapter is not added twice


def test_each_layer_gets_the_forward_once(tiny_path):
    model = _model(tiny_path, "cpu")
    assert compute_dtype_lora(model) == 0  # the build gave it already
    assert _peft(model) == compute_dtype_lora(model) > 0
