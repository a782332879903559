"""Long sequences: the chunked loss gives the plain loss and the same gradients without the whole logits tensor, and
past the original context the model runs with LongRoPE's long factors, as transformers' own forward does.
The same checks run on the GPU (marked gpu) with the 4-bit base as training uses it there."""

from __future__ import annotations

import copy

import pytest
import torch

from aegis import loading as model_mod, soul as soul_mod
from aegis.config import build
from train.data import IGNORE
from train.loss import chunked_loss_sum, masked_loss_sum, micro_loss

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


def _souled(tiny_path, device: str, quantization: str = "nf4", dtype: str = "auto"):
    cfg = build({}, ["model.base=embedded", f"model.quantization={quantization}", f"model.dtype={dtype}"])
    model, soul = model_mod.build(cfg, tiny_path, torch.device(device), seed=0)
    with torch.no_grad():  # an open gate and a real rotation, so the soul's own gradient is part of the check
        soul.alpha.fill_(1.0)
        soul.generators.normal_(0, 0.1)
    model.train()
    return model, soul


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_loss_matches_the_plain_loss_and_gradients(tiny_path, device):
    model, _ = _souled(tiny_path, device)
    head = soul_mod.head_of(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 3000, (2, 96), generator=gen).to(device)
    labels = ids.clone()
    labels[0, :20] = IGNORE  # a prompt that is not trained on
    labels[1, 80:] = IGNORE  # right padding

    torch.manual_seed(0)  # the same LoRA dropout masks on both passes
    plain = masked_loss_sum(model(input_ids=ids).logits, labels)
    plain.backward()
    want = _grads(model)

    head.deferred = True
    torch.manual_seed(0)
    hidden = model(input_ids=ids).logits
    head.deferred = False
    assert hidden.shape[-1] == model.get_base_model().config.hidden_size  # no vocabulary-wide tensor
    chunked = chunked_loss_sum(hidden, head.head, labels, chunk_tokens=37)  # chunks that do not divide the length
    chunked.backward()
    got = _grads(model)

    torch.testing.assert_close(chunked, plain.float(), rtol=1e-4, atol=1e-3)
    assert want.keys() == got.keys() and any("soul" in n for n in want) and any("lora_B" in n for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_past_the_original_context_the_long_factors_are_used(tiny_path, device):
    """The embedded model's original context is 512: a 640-token sequence through the training model (soul shut,
    LoRA still zero) gives transformers' own logits, which use the long factors (for every position, once the
    sequence is longer than the original context); the same weights with the short factors give others. Both sides
    run in float32 (on the GPU too: bfloat16 rounding alone moves these logits by up to 0.2)."""
    from transformers import AutoModelForCausalLM

    model, soul = _souled(tiny_path, device, quantization="none", dtype="float32")
    with torch.no_grad():
        soul.alpha.fill_(-60.0)  # gate 0: the base model's own head
    model.eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).to(device).eval()
    config = ref.config
    assert config.rope_parameters["rope_type"] == "longrope" and config.original_max_position_embeddings == 512
    ids = torch.randint(5, 3000, (1, 640), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
        shorts = copy.deepcopy(config)  # transformers reads the factors lazily, at the first long sequence
        shorts.rope_parameters["long_factor"] = shorts.rope_parameters["short_factor"]
        short_ref = AutoModelForCausalLM.from_config(shorts).to(device).eval()
        short_ref.load_state_dict(ref.state_dict())
        short = short_ref(input_ids=ids).logits.float()
    # transformers picks one set of factors for the whole sequence: past the original context, the long ones
    assert (short - theirs).abs().max() > 1e-1


@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_checkpointed_activations_give_the_same_gradients(tiny_path, device):
    """What the planner turns on for long sequences: gradient checkpointing, with what it keeps held in host memory
    until the backward pass (torch's save_on_cpu), through the chunked loss: the training loop's own micro_loss."""
    model, _ = _souled(tiny_path, device)
    model_mod.enable_checkpointing(model.get_base_model())
    head = soul_mod.head_of(model)
    ids = torch.randint(5, 3000, (1, 128), generator=torch.Generator().manual_seed(2)).to(device)
    grads = []
    for offload in (False, True):
        torch.manual_seed(0)  # the same LoRA dropout masks on both passes
        micro_loss(model, head, {"input_ids": ids, "labels": ids}, offload).backward()
        grads.append(_grads(model))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
