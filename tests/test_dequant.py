"""The base dequantized once (aegis/dequant.py): the same logits and gradients as the 4-bit layers, on the embedded
tiny Phi-3 loaded the product's way (NF4, double quant, LoRA on qkv_proj/o_proj, the soul); and a real run trained
this way saves, resumes and exports like a 4-bit one."""

import shutil

import bitsandbytes as bnb
import pytest
import torch
from torch.nn import functional as F

from aegis import checkpoint, loading, metrics
from aegis.config import build
from aegis.dequant import DequantizedLinear, dequantize_base, dequantized
from conftest import SHORT, train_cli

QUIET = lambda *_: None  # noqa: E731


def quantized_layers(model) -> int:
    """How many bitsandbytes Linear4bit layers `model` still has (0 once dequantized)."""
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def souled(device: torch.device, dtype: str, dequantize: bool, convert=None):
    """Base + LoRA + soul as training builds it, with every trainable tensor set to the same random values (LoRA's
    B starts at zero, which would leave A without a gradient) and α at 0 (the soul's gate half open). `convert`
    dequantizes a 4-bit build with that conversion instead of the product's."""
    cfg = build(
        {},
        [
            "model.base=embedded",
            "model.quantization=nf4",
            f"model.dtype={dtype}",
            "lora.dropout=0.0",
            f"train.dequantized_base={'true' if dequantize and convert is None else 'false'}",
        ],
    )
    model, soul = loading.build(cfg, loading.resolve_base("embedded"), device, seed=0, log=QUIET)
    if convert is not None:
        dequantize_base(model, convert)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        soul.alpha.fill_(0.0)
    model.train()  # as in training; without dropout the two forwards see the same computation
    return model, soul


def logits_and_grads(model, device):
    """One batch's logits and the gradient of its next-token loss for every trainable tensor (LoRA and soul)."""
    ids = torch.randint(0, 4000, (2, 64), generator=torch.Generator().manual_seed(2)).to(device)
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("soul.generators" in n for n in grads) and sum(".lora_" in n for n in grads) == 2 * 2 * 6
    assert all(g.abs().max() > 0 for g in grads.values())  # every one really carries a gradient
    return logits.detach().float(), grads


def differences(a, b) -> list[str]:
    """What differs between two (logits, grads) beyond fp32 rounding: relative to each tensor's largest value."""
    out = []
    for name, x, y in [("logits", a[0], b[0])] + [(n, a[1][n], b[1][n]) for n in a[1]]:
        err = (x - y).abs().max().item() / x.abs().max().item()
        if err > 1e-5:
            out.append(f"{name}: {err:.2g}")
    return out


@pytest.fixture(scope="module")
def four_bit():
    model, _ = souled(torch.device("cpu"), "auto", dequantize=False)
    assert quantized_layers(model) == 4 * 6  # the real bitsandbytes layers: qkv, o, gate_up, down per layer
    return logits_and_grads(model, torch.device("cpu"))


def test_dequantized_base_gives_the_4bit_logits_and_gradients(four_bit):
    model, _ = souled(torch.device("cpu"), "auto", dequantize=True)
    assert quantized_layers(model) == 0
    layer = model.get_base_model().model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj.base_layer, DequantizedLinear)  # inside PEFT's wrapper, which stays
    assert isinstance(layer.mlp.gate_up_proj, DequantizedLinear)  # the bare 4-bit layers too
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n and "soul" not in n)
    assert differences(four_bit, logits_and_grads(model, torch.device("cpu"))) == []


def _bf16_rounded(layer):
    dense = dequantized(layer)
    dense.weight.data = dense.weight.data.bfloat16().float()  # the weight kept at a lower precision than computed
    return dense


def _one_block_lost():
    first = []

    def convert(layer):
        dense = dequantized(layer)
        if not first:  # a single block of 64 weights, in the first layer only, read as zero
            dense.weight.data.view(-1)[:64] = 0
            first.append(layer)
        return dense

    return convert


@pytest.mark.parametrize("convert", [_bf16_rounded, _one_block_lost()], ids=["bf16-rounded", "one-block-lost"])
def test_the_comparison_catches_a_wrong_conversion(four_bit, convert):
    """The check above is not vacuous: a conversion off by bf16 rounding or by one block of one layer fails it."""
    model, _ = souled(torch.device("cpu"), "auto", dequantize=True, convert=convert)
    assert differences(four_bit, logits_and_grads(model, torch.device("cpu")))


def test_a_dequantized_run_trains_as_the_4bit_run_saves_resumes_and_exports(short_run, tmp_path):
    run = tmp_path / "run"
    sets = (*SHORT, "train.dequantized_base=true")
    proc = train_cli(run, *sets)
    assert "base dequantized once (train.dequantized_base = true" in proc.stdout + proc.stderr
    four, dense = metrics.read(short_run), metrics.read(run)
    assert [r["step"] for r in dense] == list(range(1, 13))
    for a, b in zip(four, dense):  # the same weights: the same run, step by step
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4, a["step"]
    # checkpoints hold the adapter and the soul only, exactly the keys a 4-bit run writes
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_6", "step_12"]
    assert checkpoint.is_complete(run / "final", resumable=True)
    keys = set(checkpoint.adapter_weights(run / "final"))
    assert keys == set(checkpoint.adapter_weights(short_run / "final")) and all(".lora_" in k for k in keys)
    # resume from step 6, dequantized again
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_12")
    proc = train_cli(run, *sets, resume=True)
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = metrics.read(run)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(four[6:], resumed[6:])) < 1e-5
    a, b = checkpoint.adapter_weights(short_run / "final"), checkpoint.adapter_weights(run / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # every reader loads the base from disk again: the trained model comes back with its 4-bit layers
    model, *_ = loading.load_checkpoint(run / "final", device=torch.device("cpu"))
    assert isinstance(model.get_base_model().model.layers[0].self_attn.qkv_proj.base_layer, bnb.nn.Linear4bit)
    del model
    from export.merge import merge

    report = merge(run / "final", tmp_path / "merged", log=QUIET)  # unquantized base from disk + LoRA merged
    assert report.check.relative <= report.bound and report.quantization_gap is not None


def test_each_4bit_layer_is_freed_as_it_is_replaced():
    """The peak while converting is the dense weights plus one 4-bit layer: each goes once replaced, without
    waiting for the cycle collector (a Params4bit and its module refer to each other)."""
    import gc
    import weakref

    model, _ = souled(torch.device("cpu"), "auto", dequantize=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    storage = [weakref.ref(m.weight) for m in layers]
    del layers
    gc.disable()
    try:
        freed = []
        dequantize_base(model, lambda layer: (freed.append(sum(r() is None for r in storage)), dequantized(layer))[1])
        assert freed == list(range(len(storage)))  # when the n-th is converted, the n-1 before it are gone
    finally:
        gc.enable()


def test_dequantizing_after_an_inference_repack_is_refused():
    """bitsandbytes repacks a CPU layer for inference with bf16 scales; its exact weight is gone by then."""
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64) * 0.02, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    layer.weight.quant_state.packing_format_for_cpu = True  # what the inference repack marks
    with pytest.raises(RuntimeError, match="repacked for CPU inference"):
        dequantized(layer)


@pytest.mark.gpu
def test_dequantized_base_matches_the_4bit_path_on_cuda_in_bf16():
    """On a GPU in bf16, as the seed recipe trains: bitsandbytes' CUDA kernels against the dense matmul."""
    dev = torch.device("cuda")
    four = logits_and_grads(souled(dev, "bfloat16", dequantize=False)[0], dev)
    model, _ = souled(dev, "bfloat16", dequantize=True)
    layer = model.get_base_model().model.layers[0].self_attn.qkv_proj.base_layer
    assert isinstance(layer, DequantizedLinear) and layer.weight.dtype == torch.bfloat16
    assert layer.weight.device.type == "cuda"
    dense = logits_and_grads(model, dev)
    # The same bf16 weights, but bitsandbytes may multiply with its own fused 4-bit kernel at these few rows, summing
    # in another order: outputs can differ by a bf16 rounding (2^-8 relative) here and there, compounded over 6
    # layers and back. A wrong weight shows far above that (one lost block: up to 5e-2 on the CPU, above).
    for name, x, y in [("logits", four[0], dense[0])] + [(n, four[1][n], dense[1][n]) for n in four[1]]:
        rel = ((x - y).norm() / x.norm()).item()
        cos = F.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()
        assert rel < 3e-2 and cos > 0.999, (name, rel, cos)
