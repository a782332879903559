import shutil

import bitsandbytes as bnb
import pytest
import torch

from aegis import loading as model_mod
from aegis.config import build
from aegis.errors import ModelError


def _cfg(**sets):
    return build({}, [f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="module")
def souled(tiny_path):
    cfg = _cfg(**{"model.base": "embedded", "model.quantization": "nf4"})
    return model_mod.build(cfg, tiny_path, torch.device("cpu"), seed=0)


def test_lora_lands_on_phi3_fused_projections_of_a_real_4bit_model(souled):
    model, soul = souled
    layers = model.get_base_model().config.num_hidden_layers
    names = model_mod.lora_module_names(model)
    assert len(names) == 2 * layers
    assert all(n.endswith(("self_attn.qkv_proj", "self_attn.o_proj")) for n in names)
    qkv = model.get_base_model().model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.base_layer, bnb.nn.Linear4bit)
    assert qkv.base_layer.weight.quant_state.quant_type == "nf4"
    assert qkv.base_layer.weight.quant_state.nested  # double quantization
    mlp = model.get_base_model().model.layers[0].mlp.gate_up_proj
    assert isinstance(mlp, bnb.nn.Linear4bit)  # quantized, but no LoRA: not an attention projection
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or "soul.generators" in n for n in trainable)
    assert any("soul.generators" in n for n in trainable)


def test_forward_backward_through_4bit_layers(souled, tiny_path):
    model, soul = souled
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    out = model(input_ids=ids).logits
    out.float().logsumexp(-1).sum().backward()
    lora_b = model.get_base_model().model.layers[0].self_attn.qkv_proj.lora_B["default"].weight
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0
    assert soul.generators.grad is not None
    model.zero_grad()


def test_all_linear_and_explicit_targets(tiny_path):
    base = model_mod.load_base(tiny_path, "none", torch.float32, torch.device("cpu"))
    assert model_mod.target_modules(base, "all-linear") == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert model_mod.target_modules(base, ["o_proj"]) == ["o_proj"]
    with pytest.raises(ModelError, match="q_proj, v_proj match no linear layer.*qkv_proj"):
        model_mod.target_modules(base, ["q_proj", "v_proj"])


def test_base_from_a_hub_snapshot_shaped_cache(tiny_path, tmp_path, monkeypatch):
    """model.base as a hub id goes through huggingface-hub; offline it finds the cached snapshot."""
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "hub" / "models--HODACHI--Borea-Phi-3.5-mini-Instruct-Jp"
    shutil.copytree(tiny_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    path = model_mod.resolve_base("HODACHI/Borea-Phi-3.5-mini-Instruct-Jp")
    assert path == repo / "snapshots" / commit
    with pytest.raises(ModelError, match="nobody/missing-model.*could not be fetched"):
        model_mod.resolve_base("nobody/missing-model")


def test_bad_base_names(tmp_path):
    with pytest.raises(ModelError, match="neither a directory"):
        model_mod.resolve_base(str(tmp_path / "nope" / "deeper"))


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_a_base_loads_without_the_hubs_kernels(tiny_path, quantization):
    """transformers would swap layers for kernels fetched from the hub (a network call that fails offline on a GPU,
    and other arithmetic than the one the tests check); every product load goes through aegis.pretrained."""
    model = model_mod.load_base(tiny_path, quantization, torch.float32, torch.device("cpu"))
    assert model.use_kernels is False
