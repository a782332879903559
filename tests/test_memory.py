from transformers import Phi3Config

from aegis.memory import estimate_gib, plan

PHI35 = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32)


def test_estimate_matches_the_h100_measurements():
    # measured peaks (torch.cuda.max_memory_allocated) at Phi-3.5-mini's shapes, NF4, LoRA r16 on qkv/o: BENCHMARKS.md
    for batch, ckpt, measured in [(1, False, 4.69), (8, True, 4.83)]:
        est = estimate_gib(PHI35, batch, 512, quantized=True, checkpointing=ckpt)
        assert measured <= est <= measured * 1.15, (batch, ckpt, est)


def test_auto_checkpointing_only_when_needed():
    assert plan(PHI35, 1, 512, True, 12.0, "auto").gradient_checkpointing is False
    big = plan(PHI35, 8, 512, True, 12.0, "auto")
    assert big.gradient_checkpointing is True and big.estimate_gib <= 12.0
    assert plan(PHI35, 1, 512, True, 12.0, True).gradient_checkpointing is True  # an explicit choice stands
    assert estimate_gib(PHI35, 1, 512, quantized=False, checkpointing=False) > 7.0  # bf16 weights alone ~7 GiB


def test_a_batch_that_does_not_fit_is_split_into_micro_batches():
    whole = plan(PHI35, 16, 512, True, 12.0, "auto")
    assert whole.micro_batch == 16 and whole.gradient_checkpointing  # fits with checkpointing
    split = plan(PHI35, 64, 512, True, 12.0, "auto")
    assert split.gradient_checkpointing and 64 % split.micro_batch == 0 and 1 < split.micro_batch < 64
    assert split.estimate_gib <= 12.0
    assert estimate_gib(PHI35, 2 * split.micro_batch, 512, True, True) > 12.0  # the largest divisor that fits
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
    assert (estimate_gib(PHI35, 1, 65536, True, True, True) - estimate_gib(PHI35, 1, 32768, True, True, True)
            < 2 * (estimate_gib(PHI35, 1, 32768, True, True, True) - estimate_gib(PHI35, 1, 16384, True, True, True)))
