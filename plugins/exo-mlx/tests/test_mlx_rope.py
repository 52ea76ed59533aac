"""Llama 3 long-context RoPE: the GGUF and Hugging Face descriptions give the same periods."""

from __future__ import annotations

import math

import numpy as np
from exo_mlx.loader import gguf_rope_periods, hf_llama3_periods

LLAMA_31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llamacpp_rope_factors(theta: float, dims: int, scaling: dict) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter writes (convert_hf_to_gguf.py, LlamaModel)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    factors = []
    for i in range(0, dims, 2):
        freq = 1.0 / theta ** (i / dims)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def test_gguf_rope_freqs_match_hugging_face_llama3_scaling():
    theta, dims = 500000.0, 64
    from_gguf = gguf_rope_periods(theta, dims, llamacpp_rope_factors(theta, dims, LLAMA_31))
    from_hf = hf_llama3_periods(theta, dims, LLAMA_31)
    np.testing.assert_allclose(from_gguf, from_hf, rtol=1e-5)
    plain = theta ** (np.arange(0, dims, 2) / dims)
    assert from_hf[0] == np.float32(plain[0])  # the fastest pair is untouched
    np.testing.assert_allclose(from_hf[-1], plain[-1] * 8.0, rtol=1e-5)  # the slowest is 8x longer


def test_mx_rope_takes_periods():
    """`freqs` of mx.fast.rope are periods (theta^(2i/d)), what the loader hands it."""
    import mlx.core as mx

    x = mx.random.normal((1, 2, 5, 64))
    periods = mx.array(gguf_rope_periods(10000.0, 64, np.ones(32, dtype=np.float32)))
    with_base = mx.fast.rope(x, 64, traditional=True, base=10000.0, scale=1.0, offset=3)
    with_freqs = mx.fast.rope(x, 64, traditional=True, base=None, scale=1.0, offset=3, freqs=periods)
    assert mx.allclose(with_base, with_freqs, atol=1e-5).item()
