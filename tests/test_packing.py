"""Packing that keeps documents apart (data.packing = "documents", aegis/packing.py): a token's logits depend only on
its own document, through the eager training path, the compiled blocks and the captured step's fixed buffers; plain
concatenation ("concat") still reads across the window."""

import contextlib

import pytest
import torch

from aegis import loading as model_mod, memory, packing, soul as soul_mod
from aegis.config import ConfigError, build
from train import batches, data, graphs
from train.loss import count_targets, micro_loss

ARGS = ["model.base=embedded", "model.quantization=none", "lora.dropout=0.0"]


def _model(tiny_path):
    model, soul = model_mod.build(build({}, ARGS), tiny_path, torch.device("cpu"), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the zero start, so the adapter and the soul take part
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        soul.alpha.fill_(0.7)
    return model.eval(), soul


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(5, 3000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _window(before: list[list[int]], last: list[int], mode: str) -> dict[str, torch.Tensor]:
    """One window, packed and collated as training does it: the documents `before`, then `last`."""
    docs = [data.Example(d, d) for d in [*before, last]]
    width = sum(map(len, [*before, last]))
    [window] = batches.pack(docs, width, documents=mode == "documents")
    return batches.collate([window], pad_id=0, width=width)


def _windows(rows: list[list[list[int]]], width: int) -> dict[str, torch.Tensor]:
    """Windows of `width` tokens, one per row of documents, packed and collated as training does it."""
    packed = [batches.pack([data.Example(d, d) for d in row], width, documents=True)[0] for row in rows]
    return batches.collate(packed, pad_id=0, width=width)


@contextlib.contextmanager
def _compiled(model):
    """The model's blocks compiled as training compiles them on this plan, by a backend that counts what dynamo
    compiles and runs it as traced; yields (blocks compiled, the graphs compiled so far)."""
    import torch._dynamo

    plan = memory.plan_for(build({}, ARGS), model.get_base_model().config, torch.device("cpu"))
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        yield model_mod.compile_blocks(model, plan, backend=backend), compiles
    finally:
        torch._dynamo.reset()


def _logits(model, batch, flex: bool | None = None) -> torch.Tensor:
    """The logits of the training forward (micro_loss's call, head not deferred); `flex`: which mask keeps the
    documents apart (the block mask, as on CUDA, or the additive one; by default the device's choice)."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], **packing.model_inputs(model, batch, flex)).logits[0]


@pytest.mark.parametrize("flex", [False, True], ids=["additive mask", "flex block mask"])
def test_a_tokens_logits_do_not_depend_on_the_documents_before_it(tiny_path, flex):
    """The last document's logits are the same whatever comes before it in the window, and the same as when it is
    alone; under "concat" they change. The windows are longer than the model's original context (512) while every
    document is shorter, so LongRoPE picks its factors from the restarted positions, as for the document alone.
    Both masks: the additive one of the CPU, and flex attention's block mask of CUDA (its forward runs on the CPU;
    its backward and compiled kernel are checked on CUDA, test_flex_attention_trains_as_the_additive_mask_on_cuda)."""
    model, _ = _model(tiny_path)
    assert packing.model_inputs(model, {}) == {} and not packing.flex_fits(model, torch.device("cpu"))
    assert packing.flex_fits(model, torch.device("cuda"))  # the PEFT model's config is read through (no GPU used)
    last = _tokens(120, 0)
    alone = _logits(model, batches.collate([data.Example(last, last)], pad_id=0))
    befores = [[_tokens(400, 1), _tokens(300, 2)], [_tokens(250, 3), _tokens(330, 4), _tokens(90, 5)]]
    for before in befores:
        window = _window(before, last, "documents")
        got = _logits(model, window, flex)
        torch.testing.assert_close(got[-len(last) :], alone, rtol=0, atol=1e-4)
        if flex:  # every document of the window, not only the last, as under the additive mask
            torch.testing.assert_close(got, _logits(model, window, False), rtol=0, atol=1e-4)
    concat = [_logits(model, _window(before, last, "concat"))[-len(last) :] for before in befores]
    assert (concat[0] - concat[1]).abs().max() > 0.1 and (concat[0] - alone).abs().max() > 0.1


def test_the_captured_steps_buffers_and_the_compiled_blocks_keep_documents_apart(tiny_path):
    """The captured step's fixed buffers (run eagerly here; tests/test_gpu.py captures them) give the loss and
    gradients of the eager path; the compiled blocks compile once per kind of block with the mask and positions as
    inputs, and give the same loss."""

    model, soul = _model(tiny_path)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [[_tokens(40, 6), _tokens(60, 7)], [_tokens(70, 8), _tokens(30, 9)]]
    batch = _windows(rows, 100)
    n = count_targets(batch["labels"])
    head = soul_mod.head_of(model)

    def eager():
        loss = micro_loss(model, head, batch, offload=False)
        (loss / n).backward()
        grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    want_loss, want = eager()
    step = graphs.GraphedStep(model, soul, params, 2, 100, torch.device("cpu"), capture=False, documents=True)
    try:
        step.begin()
        got_loss = step.micro(batch, 1.0 / n)
        step.end()
        got = [p.grad.clone() for p in params]
    finally:
        step.close()
        model.zero_grad(set_to_none=True)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max() + 1e-12

    with _compiled(model) as (blocks, compiles):
        assert blocks == 4 * model.get_base_model().config.num_hidden_layers
        compiled_loss, _ = eager()
    assert 4 <= len(compiles) <= 8, len(compiles)
    assert float(compiled_loss) == pytest.approx(float(want_loss), rel=1e-5)


def test_the_compiled_attention_takes_the_block_mask_as_an_input(tiny_path):
    """The block mask (CUDA's) goes through the compiled blocks as an input, as the documents' tensor does: windows
    with other documents and other boundaries run the attention block compiled once, and give the additive mask's
    logits. A graph compiled per window would soon pass torch.compile's recompile limit and run uncompiled."""
    model, _ = _model(tiny_path)
    rows = [
        [[_tokens(40, 1), _tokens(60, 2)], [_tokens(70, 3), _tokens(30, 4)]],
        [[_tokens(20, 5), _tokens(80, 6)], [_tokens(50, 7), _tokens(25, 8), _tokens(25, 9)]],
        [[_tokens(100, 10)], [_tokens(10, 11), _tokens(90, 12)]],
    ]
    with _compiled(model) as (_, compiles):
        for i, window in enumerate(rows):
            batch = _windows(window, 100)
            with torch.no_grad():
                got, want = (
                    model(input_ids=batch["input_ids"], **packing.model_inputs(model, batch, flex)).logits
                    for flex in (True, False)
                )
            if i == 0:
                first = len(compiles) - 1  # a graph per kind of block (the norms, the attention, the MLP), then
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
            assert len(compiles) == first + 1, (i, len(compiles))  # the additive mask's attention, once
    assert 3 <= first <= 6, first


def test_a_bad_packing_value_names_the_key():
    with pytest.raises(ConfigError, match=r"data.packing: 'docs' is not one of auto, documents, concat"):
        build({"data": {"packing": "docs"}})
    assert build({}).data.packing == "auto"


@pytest.mark.gpu
def test_the_captured_step_keeps_documents_apart_on_cuda(tiny_path):
    """A real CUDA-graph capture, replayed on new windows (other documents, other boundaries): the loss and the
    gradients of the eager path with the same documents, each update."""
    device = torch.device("cuda")
    cfg = build({}, ["model.base=embedded", "model.quantization=nf4", "lora.dropout=0.0"])
    model, soul = model_mod.build(cfg, tiny_path, device, seed=0)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.05)
    head = soul_mod.head_of(model)
    step = graphs.GraphedStep(model, soul, params, 2, 128, device, documents=True)
    try:
        for update in range(3):
            rows = [
                [_tokens(30 + 20 * update, 10 * update + i), _tokens(98 - 20 * update, 10 * update + i + 5)]
                for i in range(2)
            ]
            batch = _windows(rows, 128)
            n = count_targets(batch["labels"])
            step.begin()
            got_loss = float(step.micro(batch, 1.0 / n))
            step.end()
            got = [p.grad.clone() for p in params]
            soul.rotation_input = None  # the eager path computes the rotation itself
            for p in params:
                p.grad = None
            want_loss = micro_loss(model, head, {k: v.to(device) for k, v in batch.items()}, offload=False)
            (want_loss / n).backward()
            soul.rotation_input = step.rotation
            assert got_loss == pytest.approx(float(want_loss), rel=1e-2)
            for g, p in zip(got, params):
                assert (g - p.grad).abs().max() <= 2e-2 * p.grad.abs().max() + 1e-8
    finally:
        step.close()


@pytest.mark.gpu
def test_flex_attention_trains_as_the_additive_mask_on_cuda(tiny_path):
    """On CUDA the block mask is the default, and flex attention's compiled kernel (called alone, and traced inside
    the compiled blocks) gives the loss and the gradients of SDPA under the additive mask."""
    from train.loss import masked_loss_sum

    device = torch.device("cuda")
    cfg = build({}, ["model.base=embedded", "model.quantization=nf4", "lora.dropout=0.0"])
    model, _ = model_mod.build(cfg, tiny_path, device, seed=0)
    assert packing.flex_fits(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.05)
    rows = [[_tokens(150, 11), _tokens(106, 12)], [_tokens(60, 13), _tokens(120, 14), _tokens(76, 15)]]
    batch = {k: v.to(device) for k, v in _windows(rows, 256).items()}

    def step(flex):
        inputs = packing.model_inputs(model, batch, flex)
        assert isinstance(inputs["attention_mask"], torch.Tensor) != flex
        loss = masked_loss_sum(model(input_ids=batch["input_ids"], **inputs).logits, batch["labels"])
        loss.backward()
        grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        return float(loss), grads

    want_loss, want = step(False)
    runs = [step(True)]
    plan = memory.plan_for(cfg, model.get_base_model().config, device)
    assert model_mod.compile_blocks(model, plan) > 0
    runs.append(step(True))
    for got_loss, got in runs:
        assert got_loss == pytest.approx(want_loss, rel=1e-2)
        for g, w in zip(got, want):
            assert (g - w).abs().max() <= 2e-2 * w.abs().max() + 1e-8
