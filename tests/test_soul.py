import pytest
import torch
from torch import nn

from aegis.soul import FREE, Soul, SoulHead, attach


def test_identity_start_is_exactly_the_base():
    soul = Soul(64, alpha=3.0)
    assert soul.generators.shape == (8, FREE) == (8, 28)
    assert torch.equal(soul.rotation(), torch.eye(8).expand(8, 8, 8))
    h = torch.randn(2, 5, 64)
    assert torch.equal(soul(h), h)


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_rotation_is_exactly_so8(scale):
    soul = Soul(256)
    with torch.no_grad():
        soul.generators.normal_(0, scale)
    health = soul.health()
    assert health["ortho_error"] < 1e-5
    assert abs(health["det_min"] - 1) < 1e-4 and abs(health["det_max"] - 1) < 1e-4
    assert health["rotation_norm"] > 0.1


@pytest.mark.parametrize("mix", ["interpolate", "residual"])
def test_forward_is_the_documented_formula(mix):
    torch.manual_seed(0)
    soul = Soul(16, mix=mix, alpha=0.3)
    with torch.no_grad():
        soul.generators.normal_()
    h = torch.randn(3, 16)
    r = torch.block_diag(*soul.rotation())
    g = torch.sigmoid(torch.tensor(0.3))
    expected = h + g * (h @ r.T - h) if mix == "interpolate" else h + g * (h @ r.T)
    torch.testing.assert_close(soul(h), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mix", ["interpolate", "residual"])
def test_fold_equals_the_souls_logits(mix):
    torch.manual_seed(1)
    head = nn.Linear(64, 300, bias=False)
    soul = Soul(64, mix=mix, init="random", alpha=1.618)
    logits = SoulHead(head, soul)(h := torch.randn(4, 7, 64))
    folded = h @ soul.fold(head.weight).T
    assert (folded - logits).abs().max() / logits.abs().max() < 1e-5


def test_random_init_moves_off_identity_and_is_seeded():
    a = Soul(64, init="random", generator=torch.Generator().manual_seed(5))
    b = Soul(64, init="random", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.generators, b.generators)
    assert a.health()["rotation_norm"] > 0.05


def test_gradients_reach_the_generators_not_alpha():
    soul = Soul(32, alpha=0.0)
    soul(torch.randn(2, 32)).pow(2).sum().backward()
    assert soul.generators.grad is not None and soul.generators.grad.abs().sum() > 0
    assert soul.alpha.grad is None  # α is set by the schedule


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="hidden size 100 is not divisible by 8"):
        Soul(100)
    with pytest.raises(ValueError, match="soul.mix"):
        Soul(64, mix="add")
    with pytest.raises(ValueError, match="soul.init"):
        Soul(64, init="zeros")


def test_attach_wraps_the_head_of_a_real_phi3(tiny_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids).logits
    soul = Soul(model.config.hidden_size, alpha=-5.0)
    attach(model, soul)
    assert isinstance(model.lm_head, SoulHead)
    torch.testing.assert_close(model(ids).logits, before)  # identity rotation: the base model exactly
    with pytest.raises(ValueError, match="already has a soul"):
        attach(model, Soul(model.config.hidden_size))
    with pytest.raises(ValueError, match="does not match"):
        attach(AutoModelForCausalLM.from_pretrained(tiny_path), Soul(64))
