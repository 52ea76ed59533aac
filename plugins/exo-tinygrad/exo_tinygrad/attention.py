"""Attention over each sequence's KV cache: RoPE, the cache write, causal scores, softmax, values.

`model.Attention` owns the projections; this module owns what happens between them. Every
sequence of a batch has its own cache and position (see `attend`).
"""

from __future__ import annotations

import numpy as np
from tinygrad import Tensor, UOp

from exo_tinygrad import kernels
from exo_tinygrad.buffers import from_numpy
from exo_tinygrad.loader import LlamaConfig

Position = int | UOp  # a plain int, or a bound symbolic Variable under the JIT


def rope_table(config: LlamaConfig, length: int) -> Tensor:
    """cos and sin for every position: [length, head_dim] (cos halves, then sin halves)."""
    half = config.head_dim // 2
    freqs = 1.0 / config.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2 / config.head_dim)
    if config.rope_freq_factors is not None:
        freqs = freqs / np.asarray(config.rope_freq_factors, dtype=np.float64)
    angles = np.arange(length, dtype=np.float64)[:, None] * freqs[None, :]
    return from_numpy(np.concatenate([np.cos(angles), np.sin(angles)], -1).astype(np.float32))


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate-half RoPE; x [T, heads, head_dim], table [T, head_dim]."""
    half = x.shape[-1] // 2
    cos, sin = table[:, None, :half], table[:, None, half:]
    x1, x2 = x[..., :half], x[..., half:]
    return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    caches: list[Tensor],
    positions: list[Position],
    rope: Tensor,
    n_kv: int,
) -> Tensor:
    """Attention output [B, T, heads * head_dim] for q [B, T, heads, hd], k/v [B, T, kv, hd]:
    sequence b writes its T new keys and values into caches[b] [2, capacity, kv, hd] at
    positions[b], then attends causally over its own cached positions (each sequence has its
    own kernels and its own length)."""
    B, T = q.shape[0], q.shape[1]
    tables = [rope[pos : pos + T] for pos in positions]
    # q is used once per cached position: rotate it once, not inside the score kernel
    q = Tensor.stack(*[apply_rope(q[b], tables[b]) for b in range(B)]).contiguous()
    outs = []
    for b, (cache, pos) in enumerate(zip(caches, positions, strict=True)):
        # write this step's keys/values, then read the cache through the write
        store = cache[:, pos : pos + T].uop.store(Tensor.stack(apply_rope(k[b], tables[b]), v[b]).uop)
        written = Tensor(cache.uop.after(store))
        scores = kernels.attention_scores(q, written, pos, b, n_kv)  # flat [kv, g, T, capacity]
        probs = kernels.attention_softmax(scores, pos, q.shape[2] * T, T, cache.shape[1])
        outs.append(kernels.attention_values(probs, written, pos, n_kv, q.shape[2] // n_kv, T))
    out = Tensor.stack(*outs).contiguous() if B > 1 else outs[0].unsqueeze(0)
    return out
