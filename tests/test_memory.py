import pytest
import torch

from aegis.config import ConfigError, build
from aegis.memory import MIN_MICRO_TOKENS, estimate_gib, plan, plan_for
from support.training import phi35_mini

PHI35 = phi35_mini()


def test_estimate_lies_just_above_the_measured_peaks():
    # measured peaks (torch.cuda.max_memory_allocated) at Phi-3.5-mini's shapes, NF4, LoRA r16 on qkv/o: BENCHMARKS.md
    # (1 x 512 and 8 x 512 checkpointed on an H100; 4 x 512 captured, not compiled, on an H200)
    for batch, ckpt, measured in [(1, False, 4.72), (8, True, 4.83), (4, False, 10.31)]:
        est = estimate_gib(PHI35, batch, 512, quantized=True, checkpointing=ckpt)
        assert measured <= est <= measured * 1.16, (batch, ckpt, est)


def test_auto_checkpointing_only_when_no_micro_batch_of_a_thousand_positions_fits_without_it():
    assert plan(PHI35, 1, 512, True, 12.0, "auto").gradient_checkpointing is False
    # 8 x 512 does not fit whole, but 2 micro-batches of 4 x 512 (2 048 positions) do: no recompute
    big = plan(PHI35, 8, 512, True, 12.0, "auto")
    assert not big.gradient_checkpointing and big.micro_batch == 4 and big.estimate_gib <= 12.0
    assert estimate_gib(PHI35, 8, 512, True, False) > 12.0
    # in 6 GiB only 1 x 512 fits without it: fewer positions than MIN_MICRO_TOKENS, so the whole batch is checkpointed
    assert MIN_MICRO_TOKENS > 512 and estimate_gib(PHI35, 1, 512, True, False) <= 6.0
    tight = plan(PHI35, 8, 512, True, 6.0, "auto")
    assert tight.gradient_checkpointing and tight.micro_batch == 8 and tight.estimate_gib <= 6.0
    # one sequence of 2 048 positions fits without recompute; one of 8 192 does not
    assert not plan(PHI35, 1, 2048, True, 12.0, "auto").gradient_checkpointing
    assert plan(PHI35, 1, 8192, True, 12.0, "auto").gradient_checkpointing
    assert plan(PHI35, 1, 512, True, 12.0, True).gradient_checkpointing is True  # an explicit choice stands
    assert estimate_gib(PHI35, 1, 512, quantized=False, checkpointing=False) > 7.0  # bf16 weights alone ~7 GiB


def test_a_batch_that_does_not_fit_is_split_into_micro_batches():
    for batch in (16, 64):
        split = plan(PHI35, batch, 512, True, 12.0, "auto")
        assert not split.gradient_checkpointing and split.micro_batch == 4 and split.estimate_gib <= 12.0
    assert estimate_gib(PHI35, 8, 512, True, False) > 12.0  # the largest divisor that fits
    # checkpointed (asked for), the batch is split only where it must be
    forced = plan(PHI35, 64, 512, True, 12.0, True)
    assert forced.gradient_checkpointing and 64 % forced.micro_batch == 0 and 1 < forced.micro_batch < 64
    assert forced.estimate_gib <= 12.0 < estimate_gib(PHI35, 2 * forced.micro_batch, 512, True, True)
    # nothing fits: micro-batch 1, and the estimate says by how much it is over (the caller warns)
    assert plan(PHI35, 4, 512, True, 2.0, "auto").micro_batch == 1


def test_long_sequences_keep_their_activations_in_host_memory_only_when_needed():
    eight = plan(PHI35, 1, 8192, True, 12.0, "auto", "auto")
    assert eight.gradient_checkpointing and not eight.offload and eight.estimate_gib <= 12.0
    long = plan(PHI35, 1, 32768, True, 12.0, "auto", "auto")
    assert long.gradient_checkpointing and long.offload and long.estimate_gib <= 12.0
    assert estimate_gib(PHI35, 1, 32768, True, True, offload=False) > 12.0  # without offload it would not fit
    assert not plan(PHI35, 1, 512, True, 12.0, False, True).offload  # nothing to offload without checkpointing
    # the loss projects 4096 positions at a time: the logits term stops growing with the length
    assert estimate_gib(PHI35, 1, 65536, True, True, True) - estimate_gib(PHI35, 1, 32768, True, True, True) < 2 * (
        estimate_gib(PHI35, 1, 32768, True, True, True) - estimate_gib(PHI35, 1, 16384, True, True, True)
    )


SETTINGS = [(1, 512), (2, 512), (4, 512), (8, 512), (16, 512), (64, 512), (1, 2048), (1, 8192), (1, 32768)]


def test_dequantized_base_only_where_it_fits_the_4bit_plan():
    """The rule (aegis/memory.py): plan with the 4-bit base, then dequantize only if that very plan (checkpointing,
    offload, micro-batch) still fits with the linear weights at 16 bits; it never costs more of those."""
    for batch, length in SETTINGS:
        four = plan(PHI35, batch, length, True, 12.0, "auto", "auto")
        auto = plan(PHI35, batch, length, True, 12.0, "auto", "auto", "auto")
        dense = estimate_gib(PHI35, four.micro_batch, length, False, four.gradient_checkpointing, four.offload)
        assert auto.dequantized_base == (dense <= 12.0), (batch, length)
        assert (auto.gradient_checkpointing, auto.offload, auto.micro_batch) == (
            four.gradient_checkpointing,
            four.offload,
            four.micro_batch,
        ), (batch, length)
        assert auto.estimate_gib == (dense if auto.dequantized_base else four.estimate_gib)
        assert f"~{dense:.1f} GiB with the base dequantized, ~{four.estimate_gib:.1f} GiB at 4 bits" in auto.why_base
    # Phi-3.5-mini's linear weights at 16 bits instead of 4.25 bits cost ~5.5 GiB more
    extra = estimate_gib(PHI35, 1, 512, False, False) - estimate_gib(PHI35, 1, 512, True, False)
    assert 5.0 < extra < 6.0


def test_the_seed_setting_dequantizes_and_long_or_big_batches_do_not():
    seed = plan(PHI35, 1, 512, True, 12.0, "auto", "auto", "auto")
    assert seed.dequantized_base and not seed.gradient_checkpointing and seed.estimate_gib <= 12.0
    for batch, length in [(16, 512), (1, 32768)]:
        assert not plan(PHI35, batch, length, True, 12.0, "auto", "auto", "auto").dequantized_base
    # 2 x 512 fits at 4 bits without checkpointing but at 16 bits only with it: stays at 4 bits
    two = plan(PHI35, 2, 512, True, 12.0, "auto", "auto", "auto")
    assert not two.dequantized_base and not two.gradient_checkpointing
    # a bigger budget takes it: 16 x 512 as 2 micro-batches of 8 without recompute fits 32 GiB at 16 bits
    roomy = plan(PHI35, 16, 512, True, 32.0, "auto", "auto", "auto")
    assert roomy.dequantized_base and roomy.micro_batch == 8 and not roomy.gradient_checkpointing


def test_dequantized_base_off_where_it_cannot_apply_or_is_not_asked_for():
    assert not plan(PHI35, 1, 512, False, 12.0, "auto", "auto", "auto").dequantized_base  # not quantized
    assert not plan(PHI35, 1, 512, True, 12.0, "auto", "auto", False).dequantized_base
    cpu = plan(PHI35, 1, 512, True, 12.0, "auto", "auto", "auto", gpu=False)
    assert not cpu.dequantized_base and "without a CUDA device" in cpu.why_base
    assert plan(PHI35, 1, 512, True, 12.0, "auto", "auto", True, gpu=False).dequantized_base  # forced: anywhere


def test_forcing_the_dequantized_base_plans_around_it_or_names_the_key():
    # forced at 2 x 512: the step is planned with 16-bit weights, so checkpointing comes on to fit
    two = plan(PHI35, 2, 512, True, 12.0, "auto", "auto", True)
    assert two.dequantized_base and two.gradient_checkpointing and two.estimate_gib <= 12.0
    assert two.estimate_gib == estimate_gib(PHI35, 2, 512, False, True)
    # what cannot fit even at micro-batch 1 with checkpointing and offload is an error naming the key
    with pytest.raises(ConfigError, match=r"(?s)train\.dequantized_base = true.*over train\.memory_budget_gib 12"):
        plan(PHI35, 1, 32768, True, 12.0, "auto", "auto", True)
    with pytest.raises(ConfigError, match=r"(?s)train\.dequantized_base = true.*model\.quantization"):
        plan(PHI35, 1, 512, False, 12.0, "auto", "auto", True)


def test_the_setting_is_validated_and_reaches_the_plan():
    with pytest.raises(ConfigError, match=r"train\.dequantized_base: expected true, false or \"auto\""):
        build({}, ["train.dequantized_base=sometimes"])
    assert build({}).train.dequantized_base == "auto"
    cfg = build({}, ["train.dequantized_base=true"])
    assert plan_for(cfg, PHI35, torch.device("cpu")).dequantized_base
    auto = build({})
    assert not plan_for(auto, PHI35, torch.device("cpu")).dequantized_base  # "auto" keeps the CPU at 4 bits
    assert plan_for(auto, PHI35, torch.device("cuda")).dequantized_base  # the seed recipe on a GPU


def test_the_plan_stays_within_what_the_gpu_has_free():
    """A 12 GB card does not have 12 GiB free (the CUDA context, a desktop): the budget is the smaller of the
    setting and the free memory less a reserve, and the log says so; with room to spare the setting stands."""
    from aegis.memory_budget import DEVICE_RESERVE_GIB, device_budget

    assert device_budget(12.0, None) == (12.0, "")
    assert device_budget(12.0, 80.0) == (12.0, "")
    budget, note = device_budget(12.0, 11.2)
    assert budget == pytest.approx(11.2 - DEVICE_RESERVE_GIB)
    assert "11.2 GiB free" in note and "train.memory_budget_gib 12" in note
    # what it changes: at Phi-3.5-mini's shapes the seed step keeps its dequantized base in 12 GiB, not in 10
    roomy = plan(PHI35, 1, 512, True, 12.0, "auto", "auto", "auto")
    tight = plan(PHI35, 1, 512, True, device_budget(12.0, 10.0)[0], "auto", "auto", "auto")
    assert roomy.dequantized_base and not tight.dequantized_base


@pytest.mark.gpu
def test_the_gpu_plan_uses_the_free_memory():
    cfg = build({}, ["train.memory_budget_gib=10000"])  # more than any card has
    p = plan_for(cfg, PHI35, torch.device("cuda"))
    assert p.budget_gib < torch.cuda.mem_get_info()[0] / 2**30
