"""What several benchmarks share, so that each measures the same way: Phi-3.5-mini's shapes.

Only the standard library and aegis.tiny load with it: bench/train_unsloth.py imports it in Unsloth's own environment,
where Unsloth must come before transformers.
"""

from __future__ import annotations

from aegis.tiny import shape

# Phi-3.5-mini-instruct's shapes: 3.82 B parameters.
PHI35 = shape(3072, 8192, 32, 32, 32, vocab_size=32064, max_position_embeddings=131072)
PHI35 |= {"original_max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}


def ramp_factors(n: int) -> tuple[list[float], list[float]]:
    """LongRoPE factors rising evenly over the `n` frequencies: short ones from 1 toward 2, long ones toward 5."""
    return [1.0 + i / n for i in range(n)], [1.0 + 4 * i / n for i in range(n)]
