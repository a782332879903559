"""The captured training step (train/graphs.py): same loss and gradients as the plain step.

On the CPU the step's fixed buffers and its split of the soul's rotation run eagerly; on a GPU (`pytest -m gpu`)
the same comparison runs through a real CUDA-graph capture and replays."""

import pytest
import torch

from aegis import loading as model_mod, metrics
from aegis.config import ConfigError, build
from conftest import SHORT, train_cli
from train import data, graphs
from train.batches import collate
from train.loss import count_targets, masked_loss_sum


def _souled(tiny_path, device):
    cfg = build({}, ["model.base=embedded", "model.quantization=nf4", "lora.dropout=0.0"])
    model, soul = model_mod.build(cfg, tiny_path, device, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off the zero start so every trainable tensor has a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        soul.alpha.fill_(0.7)
    model.eval()  # no dropout anywhere: the two paths must agree exactly
    return model, soul, [p for p in model.parameters() if p.requires_grad]


def _batches(device, n, width=64, seed=0):
    """n micro-batches of 2 rows, the second row right-padded, as the loop's collate makes them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a = torch.randint(12, 4000, (width,), generator=gen).tolist()
        b = torch.randint(12, 4000, (width - 20,), generator=gen).tolist()
        out.append(collate([data.Example(a, a), data.Example(b, b)], pad_id=0, width=width))
    return out


def _plain(model, params, batches, device):
    for p in params:
        p.grad = None
    n = sum(count_targets(b["labels"]) for b in batches)
    total = 0.0
    for b in batches:
        loss = masked_loss_sum(model(input_ids=b["input_ids"].to(device)).logits, b["labels"].to(device))
        (loss / n).backward()
        total += float(loss)
    return total, [p.grad.clone() for p in params]


def _captured(step, params, batches):
    n = sum(count_targets(b["labels"]) for b in batches)
    step.begin()
    total = sum(float(step.micro(b, 1.0 / n)) for b in batches)
    step.end()
    return total, [p.grad.clone() for p in params]


def _compare(tiny_path, device, capture, tol):
    model, soul, params = _souled(tiny_path, device)
    step = graphs.GraphedStep(model, soul, params, 2, 64, device, capture=capture)
    try:
        for update in range(3):  # new data each update, two micro-batches accumulated, α moved in place
            batches = _batches(device, 2, seed=update)
            with torch.no_grad():
                soul.alpha.fill_(0.7 + update)
            got_loss, got = _captured(step, params, batches)
            soul.rotation_input = None  # the plain path computes the rotation itself
            want_loss, want = _plain(model, params, batches, device)
            soul.rotation_input = step.rotation
            assert got_loss == pytest.approx(want_loss, rel=tol)
            gen_index = next(i for i, p in enumerate(params) if p is soul.generators)
            assert want[gen_index].abs().sum() > 0
            for g, w in zip(got, want):
                assert (g - w).abs().max() <= tol * w.abs().max() + 1e-12
            with torch.no_grad():  # an optimizer-like change of every parameter between updates
                for p in params:
                    p.add_(0.01 * torch.randn_like(p))
    finally:
        step.close()


def test_fixed_buffers_and_split_rotation_match_the_plain_step(tiny_path):
    _compare(tiny_path, torch.device("cpu"), capture=False, tol=1e-5)


def test_a_batch_of_another_shape_is_refused(tiny_path):
    model, soul, params = _souled(tiny_path, torch.device("cpu"))
    step = graphs.GraphedStep(model, soul, params, 2, 64, torch.device("cpu"), capture=False)
    step.begin()
    with pytest.raises(ValueError, match=r"shape \(2, 32\).*\(2, 64\)"):
        step.micro(_batches(torch.device("cpu"), 1, width=32)[0], 1.0)
    step.close()
    assert soul.rotation_input is None


def test_decide():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert graphs.decide("auto", cpu, 1, False) == (False, "there is no CUDA device")
    assert graphs.decide(False, gpu, 1, False)[0] is False
    assert graphs.decide("auto", gpu, 1, True)[0] is False  # large batches are not launch-bound
    assert graphs.decide(True, gpu, 1, True)[0] is True
    with pytest.raises(ConfigError, match=r"(?s)train.cuda_graphs = true.*2 processes"):
        graphs.decide(True, gpu, 2, False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        graphs.decide(True, cpu, 1, False)


def test_decide_reads_the_models_rope(tiny_path):
    from transformers import AutoConfig, LlamaConfig

    gpu = torch.device("cuda")
    assert graphs.decide("auto", gpu, 1, False, AutoConfig.from_pretrained(tiny_path))[0] is True  # LongRoPE
    dynamic = LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert graphs.decide("auto", gpu, 1, False, dynamic) == (False, "rope type 'dynamic' synchronises with the host")
    with pytest.raises(ConfigError, match="rope type 'dynamic'"):
        graphs.decide(True, gpu, 1, False, dynamic)


@pytest.mark.gpu
def test_replayed_graph_matches_the_plain_step_on_cuda(tiny_path):
    _compare(tiny_path, torch.device("cuda"), capture=True, tol=1e-2)  # bf16 compute


@pytest.mark.gpu
def test_training_with_and_without_graphs_gives_the_same_curve(tiny_path, tmp_path):
    runs = {}
    for flag in ("true", "false"):
        run = tmp_path / flag
        # model.compile as the Borea config sets it: the captured run replays the compiled blocks
        proc = train_cli(run, *SHORT, "lora.dropout=0.0", f"train.cuda_graphs={flag}", "model.compile=true")
        said = proc.stdout + proc.stderr
        assert f"CUDA graphs {'on' if flag == 'true' else 'off'}" in said
        assert "model.compile: " in said and "blocks of the decoder layers compiled" in said
        runs[flag] = metrics.read(run)
    on, off = runs["true"], runs["false"]
    assert len(on) == len(off) == 12
    # bf16 keeps ~3 significant digits and the compiled run rounds in other places than the replayed eager kernels:
    # at the embedded model's losses (~0.4) that is ~1e-3 apart; a replay of stale inputs or lost gradients moves the
    # loss by the step-to-step spread of the windows (tenths here)
    for a, b in zip(on, off):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=5e-3)
        assert a["gate"] == pytest.approx(b["gate"], abs=1e-6)
    assert on[-1]["ortho_error"] < 1e-5


def test_the_training_attention_builds_no_mask_even_while_a_graph_is_captured(tiny_path, monkeypatch):
    """aegis/causal.py: transformers takes a CUDA-graph capture for tracing and then builds the full causal mask,
    which the captured step would run (and a compiled attention recompile for); the training build's attention
    builds none and runs SDPA causally, with the same logits."""
    from aegis.causal import NAME

    model, _, _ = _souled(tiny_path, torch.device("cpu"))
    base = model.get_base_model()
    assert base.config._attn_implementation == NAME
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        masks.append((attn_mask is None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(5, 3000, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        model(input_ids=ids)
        assert masks and set(masks) == {(True, True)}  # no mask, causal, capturing or not
        masks.clear()
        base.set_attn_implementation("sdpa")
        model(input_ids=ids)
        assert not any(none for none, _ in masks)  # transformers' own, "capturing": a mask built and passed
        monkeypatch.undo()
        torch.testing.assert_close(model(input_ids=ids).logits, ours, rtol=0, atol=0)


def test_a_model_that_needs_its_own_mask_keeps_it(tiny_path):
    """A sliding window shorter than the sequences is a mask causal attention alone does not make."""
    from transformers import AutoModelForCausalLM

    from aegis.causal import use_causal_sdpa

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    model.config.sliding_window = 32
    assert not use_causal_sdpa(model, 64) and model.config._attn_implementation == "sdpa"
    assert use_causal_sdpa(model, 32) and model.config._attn_implementation != "sdpa"
