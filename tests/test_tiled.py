"""The tiled MLP and attention (aegis/tiled.py): the same loss and gradients as the whole MLP and attention, far less
kept for the backward pass, and the memory plan turns each on only where one sequence would not fit otherwise. The
same checks run on the GPU (marked gpu) with the 4-bit base, checkpointing and offload as a long run uses them
there."""

from __future__ import annotations

import pytest
import torch

from aegis import loading as model_mod
from aegis.config import ConfigError, build
from aegis.forwards import given
from aegis.memory import estimate_gib, plan
from aegis.tiled import _tiled_attention, _tiled_forward, tile_attentions, tile_mlps
from support.training import assert_grads_close, loss_and_grads, phi35_mini

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]
PHI35 = phi35_mini()


def _model(tiny_path, device: str, *sets: str):
    # On the GPU: the real 4-bit layers, computing in float32 (in bf16 a slice's matmul rounds differently from the
    # whole's, which would hide small errors), and no LoRA dropout (a slice draws other random numbers there than
    # that part of the whole; on the CPU it draws the same ones, so dropout stays on)
    gpu = ["model.quantization=nf4", "model.dtype=float32", "lora.dropout=0.0"] if device == "cuda" else []
    cfg = build(
        {},
        [
            "model.base=embedded",
            "model.quantization=none",
            'lora.target_modules=["qkv_proj","o_proj","gate_up_proj"]',
            *gpu,
            *sets,
        ],
    )
    model, soul = model_mod.build(cfg, tiny_path, torch.device(device), seed=0)
    with torch.no_grad():  # an open gate and a real rotation
        soul.alpha.fill_(1.0)
        soul.generators.normal_(0, 0.1)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # LoRA B starts at zero: give the MLP's adapter a gradient path of its own
                p.normal_(0, 0.02)
    model.train()
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_gives_the_same_loss_and_gradients(tiny_path, device, checkpointing):
    """Slices of 48 positions over a 200-token sequence (the last slice short), LoRA on the MLP too, with and without
    gradient checkpointing (with it, the kept activations offloaded as a long run does)."""
    model = _model(tiny_path, device)
    if checkpointing:
        model_mod.enable_checkpointing(model.get_base_model())
    ids = torch.randint(5, 3000, (1, 200), generator=torch.Generator().manual_seed(3)).to(device)
    whole, want = loss_and_grads(model, ids, offload=checkpointing)
    assert tile_mlps(model, 48) == model.get_base_model().config.num_hidden_layers
    tiled, got = loss_and_grads(model, ids, offload=checkpointing)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-4)
    assert want.keys() == got.keys()
    assert any("gate_up_proj.lora_B" in n for n in want) and any("soul" in n for n in want)
    if device == "cpu":
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)
    else:  # float32 on the GPU, where the slices' matmuls sum in another order than the whole's
        assert_grads_close(got, want, rel=1e-3)


def _saved_bytes(module, x, weights=()) -> int:
    """Bytes the module's forward keeps for its backward pass, directly or as a checkpoint's inputs; the storages of
    `weights` (parameters, which exist anyway) not counted."""
    storages = {}
    skip = {w.untyped_storage().data_ptr() for w in weights}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return sum(storages.values()), out


def test_a_tiled_mlp_keeps_one_slice_not_the_whole_sequence(tiny_path):
    """What the slicing is for: at 8 slices, the MLP's own intermediates are kept for none of them (each slice keeps
    only its input, a view of the layer's), so it keeps far less than the whole MLP does."""
    model = _model(tiny_path, "cpu")
    model.eval()  # no dropout, so both calls compute the same; gradients are still recorded
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(1, 512, mlp.gate_up_proj.in_features, requires_grad=True)
    whole, want = _saved_bytes(mlp, x)
    tile_mlps(model, 64)
    tiled, got = _saved_bytes(mlp, x)
    torch.testing.assert_close(got, want)
    assert whole > 4 * x.numel() * 4 and tiled < whole / 4, (whole, tiled)


def test_the_plan_tiles_the_mlp_only_where_one_sequence_would_not_fit():
    for length in (512, 8192, 32768, 49152):  # what fits with checkpointing and offload stays as it was
        assert not plan(PHI35, 1, length, True, 12.0, "auto", "auto", "auto", True, "auto").tiled_mlp
    long = plan(PHI35, 1, 81920, True, 12.0, "auto", "auto", "auto", True, "auto")  # 10x plain PEFT's 8 192
    assert long.tiled_mlp and long.gradient_checkpointing and long.offload and long.estimate_gib <= 12.0
    assert estimate_gib(PHI35, 1, 81920, True, True, True, tiled=False) > 12.0
    # an explicit choice stands: forced on at 512 tokens, off at 80 k (then over the budget: the loader warns)
    assert plan(PHI35, 1, 512, True, 12.0, "auto", "auto", "auto", True, True).tiled_mlp
    forced_off = plan(PHI35, 1, 81920, True, 12.0, "auto", "auto", "auto", True, False)
    assert not forced_off.tiled_mlp and forced_off.estimate_gib > 12.0


def test_the_setting_is_validated_and_reaches_the_model(tiny_path):
    with pytest.raises(ConfigError, match="train.tiled_mlp"):
        build({}, ['train.tiled_mlp="sometimes"'])
    said = []
    model = _model(tiny_path, "cpu", "train.tiled_mlp=true")
    layers = model.get_base_model().model.layers
    assert all(given(layer.mlp, _tiled_forward) for layer in layers)
    assert tile_mlps(model) == 0  # once: the build's MLPs are not wrapped again
    cfg = build({}, ["model.base=embedded", "model.quantization=none", "train.tiled_mlp=true"])
    model_mod.build(cfg, tiny_path, torch.device("cpu"), seed=0, log=said.append)
    assert any("each MLP 4096 positions at a time" in line for line in said), said
    untiled = _model(tiny_path, "cpu")  # auto, a short sequence: the MLP's own forward
    assert not given(untiled.get_base_model().model.layers[0].mlp, _tiled_forward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_attention_gives_the_same_loss_and_gradients(tiny_path, device, checkpointing):
    """Groups of 3 key/value heads of the embedded model's 8 (the last group short) over a 200-token sequence, LoRA on
    qkv_proj and o_proj; with checkpointing (and offload) the MLP is tiled too, as a long run has them. No LoRA
    dropout: the tiled attention draws o_proj's per group, other numbers than one draw over the whole."""
    model = _model(tiny_path, device, "lora.dropout=0.0")
    if checkpointing:
        model_mod.enable_checkpointing(model.get_base_model())
    ids = torch.randint(5, 3000, (1, 200), generator=torch.Generator().manual_seed(3)).to(device)
    whole, want = loss_and_grads(model, ids, offload=checkpointing)
    layers = model.get_base_model().config.num_hidden_layers
    assert tile_attentions(model, 3, 64) == layers
    if checkpointing:
        assert tile_mlps(model, 48) == layers
    tiled, got = loss_and_grads(model, ids, offload=checkpointing)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-4)
    assert want.keys() == got.keys()
    assert any("qkv_proj.lora_B" in n for n in want) and any("o_proj.lora_A" in n for n in want)
    # o_proj's output is summed over the groups, in another order than one matmul sums it: whole-tensor differences
    assert_grads_close(got, want, rel=1e-5 if device == "cpu" else 1e-3)


def test_tiled_attention_recomputes_with_the_dropout_masks_its_forward_drew(tiny_path, monkeypatch):
    """With LoRA dropout on, each group is recomputed in the backward pass: it must draw the masks its forward drew,
    or the gradients would not be those of the loss. The reference is the same forward with nothing recomputed."""
    import aegis.tiled

    model = _model(tiny_path, "cpu")
    assert model.peft_config["default"].lora_dropout > 0
    tile_attentions(model, 3, 64)
    ids = torch.randint(5, 3000, (1, 200), generator=torch.Generator().manual_seed(4))
    loss, got = loss_and_grads(model, ids)
    monkeypatch.setattr(aegis.tiled, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    kept, want = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, kept)
    assert_grads_close(got, want, rel=1e-5)


def _attention_call(model, length: int):
    inner = model.get_base_model().model
    attn = inner.layers[0].self_attn
    x = torch.randn(1, length, inner.config.hidden_size, requires_grad=True)
    rope = inner.rotary_emb(x, torch.arange(length)[None])
    return attn, x, rope


def test_a_tiled_attention_keeps_one_group_not_all_heads(tiny_path):
    """What the grouping is for: each group keeps only the layer's normed input (and LoRA's small product), so the
    attention keeps far less for its backward pass than all heads at once; the output is the same."""
    model = _model(tiny_path, "cpu", "lora.dropout=0.0")
    attn, x, rope = _attention_call(model, 512)

    def run(t):
        return attn(hidden_states=t, position_embeddings=rope, attention_mask=None)[0]

    whole, want = _saved_bytes(run, x, list(model.parameters()))
    tile_attentions(model, 2, 64)
    tiled, got = _saved_bytes(run, x, list(model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert tiled < whole / 4, (whole, tiled)


def test_the_tiled_attention_runs_the_modules_own_forward_where_it_does_not_apply(tiny_path):
    """Short sequences, a mask, inference: the attention's own forward, so the result is exactly the module's."""
    model = _model(tiny_path, "cpu", "lora.dropout=0.0")
    attn, x, rope = _attention_call(model, 100)
    mask = torch.zeros(1, 1, 100, 100).masked_fill(torch.ones(100, 100).triu(1).bool(), float("-inf"))
    cases = [(x[:, :50], rope[0][:, :50], rope[1][:, :50], None, True), (x, *rope, mask, True), (x, *rope, None, False)]
    want = []
    for t, cos, sin, m, grad in cases:
        with torch.set_grad_enabled(grad):
            want.append(attn(hidden_states=t, position_embeddings=(cos, sin), attention_mask=m)[0])
    tile_attentions(model, 2, 64)
    assert given(attn, _tiled_attention)
    for (t, cos, sin, m, grad), w in zip(cases, want):
        with torch.set_grad_enabled(grad):
            assert torch.equal(attn(hidden_states=t, position_embeddings=(cos, sin), attention_mask=m)[0], w)


def test_the_plan_tiles_the_attention_only_where_the_tiled_mlp_is_not_enough():
    for length in (512, 32768, 81920):
        assert not plan(PHI35, 1, length, True, 12.0, "auto", "auto", "auto", True, "auto", "auto").tiled_attention
    long = plan(PHI35, 1, 131072, True, 12.0, "auto", "auto", "auto", True, "auto", "auto")  # 10x plain's 12 288
    assert long.tiled_attention and long.tiled_mlp and long.offload and long.estimate_gib <= 12.0
    assert estimate_gib(PHI35, 1, 131072, True, True, True, True, tiled_attention=False) > 12.0
    assert not plan(PHI35, 1, 131072, True, 12.0, "auto", "auto", "auto", True, "auto", False).tiled_attention


def test_the_tiled_attention_setting_is_validated_and_reaches_the_model(tiny_path):
    with pytest.raises(ConfigError, match="train.tiled_attention"):
        build({}, ['train.tiled_attention="sometimes"'])
    said = []
    cfg = build({}, ["model.base=embedded", "model.quantization=none", "train.tiled_attention=true"])
    model, _ = model_mod.build(cfg, tiny_path, torch.device("cpu"), seed=0, log=said.append)
    layers = model.get_base_model().model.layers
    assert all(given(layer.self_attn, _tiled_attention) for layer in layers)
    assert tile_attentions(model) == 0  # once
    assert any("each attention 4 key/value heads at a time" in line for line in said), said
    untiled = _model(tiny_path, "cpu")
    assert not given(untiled.get_base_model().model.layers[0].self_attn, _tiled_attention)
