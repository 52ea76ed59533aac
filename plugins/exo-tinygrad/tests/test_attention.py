"""Attention (RoPE, cache write, scores, softmax, values kernels) agrees with plain numpy
attention at a long context, chunk after chunk under a TinyJit with a symbolic position, as
prefill and decode run it."""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels import on_tinygrad_thread

HEADS, KV, HD = 9, 3, 64  # SmolLM2-135M's grouped-query shape
CHUNK = 32


def rope_np(x: np.ndarray, positions: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """Rotate-half RoPE of x [T, heads, hd] at `positions`."""
    half = x.shape[-1] // 2
    freqs = 1.0 / theta ** (np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
    angles = positions[:, None] * freqs[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def attention_np(q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos: int) -> np.ndarray:
    """Causal attention of rotated q [T, heads, hd] at pos.. over keys/values [pos + T, kv, hd]."""
    T, group = len(q), HEADS // KV
    out = np.zeros((T, HEADS, HD), np.float64)
    visible = np.arange(pos + T)[None, :] <= pos + np.arange(T)[:, None]
    for h in range(HEADS):
        scores = q[:, h].astype(np.float64) @ keys[:, h // group].T.astype(np.float64) / np.sqrt(HD)
        scores = np.where(visible, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ values[:, h // group]
    return out.reshape(T, HEADS * HD)


@pytest.mark.parametrize("kernels", ["cpu-opts", "plain"])
@on_tinygrad_thread
def test_attention_matches_numpy_at_a_long_context(monkeypatch, kernels):
    """With the CPU opts, and without them (what other devices run)."""
    if kernels == "plain":
        monkeypatch.setenv("EXO_TINYGRAD_KERNELS", "plain")
    from exo_tinygrad import attention
    from exo_tinygrad.engine import _configure_tinygrad

    _configure_tinygrad()
    from tinygrad import Tensor, TinyJit, UOp

    rng = np.random.default_rng(0)
    start = 2950  # not a multiple of the kernels' 8 lanes
    cap = 3104
    cache_np = np.zeros((2, cap, KV, HD), np.float32)
    cache_np[:, :start] = rng.standard_normal((2, start, KV, HD)).astype(np.float32)
    cache = Tensor(cache_np.copy()).realize()
    positions = np.arange(cap, dtype=np.float64)
    freqs = 1.0 / 10000.0 ** (np.arange(HD // 2, dtype=np.float64) * 2 / HD)
    angles = positions[:, None] * freqs[None, :]
    rope = Tensor(np.concatenate([np.cos(angles), np.sin(angles)], -1).astype(np.float32)).realize()
    pos_var = UOp.variable("pos", 0, cap - CHUNK)

    def step(q, k, v, cache, pos):
        return attention.attend(q, k, v, [cache], [pos], rope, KV).realize()

    prefill, decode = TinyJit(step), TinyJit(step)
    keys, values = cache_np[0, :start].copy(), cache_np[1, :start].copy()
    pos = start
    # three prefill chunks, then decode steps: each sees every position written before it
    for T in (CHUNK, CHUNK, CHUNK, 1, 1, 1):
        q = rng.standard_normal((T, HEADS, HD)).astype(np.float32)
        k = rng.standard_normal((T, KV, HD)).astype(np.float32)
        v = rng.standard_normal((T, KV, HD)).astype(np.float32)
        jit = prefill if T > 1 else decode
        args = [Tensor(a[None]).realize() for a in (q, k, v)]
        out = jit(*args, cache, pos_var.bind(pos)).numpy().reshape(T, HEADS * HD)
        keys = np.concatenate([keys, rope_np(k, positions[pos : pos + T]).astype(np.float32)])
        values = np.concatenate([values, v])
        expected = attention_np(rope_np(q, positions[pos : pos + T]), keys, values, pos)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
        pos += T
    # the cache holds every rotated key and value at its position
    written = cache.numpy()
    np.testing.assert_allclose(written[0, :pos], keys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(written[1, :pos], values)
