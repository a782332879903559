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
    # The loss projects h' on a fixed direction u, which a rotation changes (unlike ||h'||^2, whose gradient at
    # the identity is exactly zero). At A = 0, dR = dA - dA^T, so d(u . h')/dA_ij = g (u_i h_j - u_j h_i) per block.
    torch.manual_seed(0)
    soul = Soul(32, alpha=0.0)
    h, u = torch.randn(3, 32), torch.randn(32)
    (soul(h) @ u).sum().backward()
    g = torch.sigmoid(torch.tensor(0.0))
    hb, ub = h.unflatten(-1, (4, 8)), u.unflatten(-1, (4, 8))
    outer = torch.einsum("bi,nbj->bij", ub, hb)  # (blocks, 8, 8): sum over the batch of u_i h_j
    rows, cols = torch.triu_indices(8, 8, offset=1)
    expected = g * (outer - outer.transpose(1, 2))[:, rows, cols]
    assert expected.abs().min() > 1e-3  # the check below could not pass on a zero gradient
    torch.testing.assert_close(soul.generators.grad, expected, rtol=1e-5, atol=1e-6)
    assert soul.alpha.grad is None  # α belongs to the schedule unless soul.alpha_mode = "learned"


def test_a_learned_alpha_gets_its_gradient():
    soul = Soul(32, alpha=0.0)
    soul.alpha.requires_grad_(True)  # what training does for soul.alpha_mode = "learned"
    with torch.no_grad():
        soul.generators.normal_()
    h, u = torch.randn(3, 32), torch.randn(32)
    (soul(h) @ u).sum().backward()
    # d(u . h')/dα = g (1 - g) u . (R h - h)
    r = torch.block_diag(*soul.rotation()).detach()
    expected = 0.25 * ((h @ r.T - h) @ u).sum()
    torch.testing.assert_close(soul.alpha.grad, expected, rtol=1e-5, atol=1e-6)
    assert soul.generators.grad.abs().sum() > 0


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
