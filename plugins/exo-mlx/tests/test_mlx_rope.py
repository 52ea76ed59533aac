"""Llama 3 long-context RoPE reaches mx.fast.rope as per-pair periods."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from exo_mlx.loader import rope_periods

from exo_core.checkpoint import LlamaConfig, llama3_rope_factors

LLAMA_31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
CONFIG = LlamaConfig(
    arch="llama",
    dim=128,
    n_layers=1,
    n_heads=2,
    n_kv_heads=2,
    head_dim=64,
    hidden_dim=256,
    vocab_size=32,
    norm_eps=1e-5,
    rope_theta=500000.0,
    max_context=64,
)


def test_llama3_periods():
    theta, dims = CONFIG.rope_theta, CONFIG.head_dim
    assert rope_periods(CONFIG) is None  # plain RoPE: mx.fast.rope's base does it
    config = replace(CONFIG, rope_freq_factors=llama3_rope_factors(theta, dims, LLAMA_31))
    periods = np.array(rope_periods(config))
    plain = theta ** (np.arange(0, dims, 2) / dims)
    assert periods[0] == np.float32(plain[0])  # the fastest pair is untouched
    np.testing.assert_allclose(periods[-1], plain[-1] * 8.0, rtol=1e-5)  # the slowest is 8x longer


def test_mx_rope_takes_periods():
    """`freqs` of mx.fast.rope are periods (theta^(2i/d)), what the loader hands it."""
    import mlx.core as mx

    x = mx.random.normal((1, 2, 5, 64))
    config = replace(CONFIG, rope_theta=10000.0, rope_freq_factors=(1.0,) * 32)
    periods = rope_periods(config)
    with_base = mx.fast.rope(x, 64, traditional=True, base=10000.0, scale=1.0, offset=3)
    with_freqs = mx.fast.rope(x, 64, traditional=True, base=None, scale=1.0, offset=3, freqs=periods)
    assert mx.allclose(with_base, with_freqs, atol=1e-5).item()
