"""A Llama-family transformer shard in tinygrad: RMSNorm, RoPE, grouped-query attention, SwiGLU.

The shard runs layers start..end of a model. Its input is hidden states (the first stage's
embedding lookup happens on the host, see loader.py); its output is hidden states or, on the
last stage, the logits of one chosen position per sequence. Several sequences can run in one
call (a batch of decode steps): the projections see them as one matrix, so the weights are
read once, while each sequence attends over its own KV cache from its own position.

Quantised weights stay quantised in memory; `kernels.matmul` dequantises inside the matmul.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from tinygrad import Tensor, UOp, dtypes

from exo_tinygrad import attention, kernels, quant
from exo_tinygrad.buffers import from_numpy, zeros
from exo_tinygrad.loader import LlamaConfig, ShardWeights, Weight

Position = int | UOp  # a plain int, or a bound symbolic Variable under the JIT


class Linear:
    """x @ W.T (+ b) for several weights that read the same input (q/k/v, gate/up).

    Consecutive quantised weights of one format share one kernel call; float weights
    (safetensors, F16/F32 GGUF) use tinygrad's own matmul.
    """

    def __init__(self, weights: Sequence[Weight], biases: Sequence[np.ndarray | None] | None = None) -> None:
        self.sizes = [w.q.shape[0] if isinstance(w, quant.Unpacked) else w.shape[0] for w in weights]
        biases = list(biases or [None] * len(weights))
        self.bias = None
        if any(b is not None for b in biases):
            parts = [
                np.zeros(n, np.float32) if b is None else b for n, b in zip(self.sizes, biases, strict=True)
            ]
            self.bias = from_numpy(np.concatenate(parts).astype(np.float32))
        self.parts: list[kernels.PackedWeight | Tensor] = []
        for _, run in itertools.groupby(weights, key=_format):
            group = list(run)
            if isinstance(group[0], quant.Unpacked):
                self.parts.append(kernels.pack(_concat(group)))
            else:  # float16 stays float16 in memory; the matmul reads it as float32
                self.parts.append(from_numpy(np.concatenate(group)))

    def __call__(
        self,
        x: Tensor,
        *,
        norm: tuple[Tensor, float] | None = None,
        residual: Tensor | None = None,
    ) -> Tensor:
        """x @ W.T for all weights, concatenated. Fused as in `kernels.matmul`: `norm` RMS-
        normalises x first (weight, eps), `residual` is added to the result."""
        if len(self.parts) == 1 and isinstance(self.parts[0], kernels.PackedWeight) and self.bias is None:
            return kernels.matmul(x, self.parts[0], norm=norm, residual=residual)
        outs = []
        for part in self.parts:
            if isinstance(part, kernels.PackedWeight):
                outs.append(kernels.matmul(x, part, norm=norm))
            else:
                xn = x if norm is None else rms_norm(x, norm[0], norm[1])
                outs.append(xn @ part.cast(dtypes.float32).T)
        y = outs[0].cat(*outs[1:], dim=-1) if len(outs) > 1 else outs[0]
        if self.bias is not None:
            y = y + self.bias
        return y if residual is None else y + residual

    def split(self, y: Tensor) -> list[Tensor]:
        """Each weight's output (q, k, v) from the concatenated result."""
        return list(y.split(self.sizes, dim=-1))

    @property
    def nbytes(self) -> int:
        total = sum(p.nbytes if isinstance(p, kernels.PackedWeight) else p.nbytes() for p in self.parts)
        return total + (self.bias.nbytes() if self.bias is not None else 0)


def _format(w: Weight) -> tuple:
    if isinstance(w, quant.Unpacked):
        return ("quant", w.bits == 4, w.group, w.offset is None)
    return ("float", str(w.dtype))


def _concat(weights: Sequence[quant.Unpacked]) -> quant.Unpacked:
    if len(weights) == 1:
        return weights[0]
    first = weights[0]
    offset = None if first.offset is None else np.concatenate([w.offset for w in weights])
    return quant.Unpacked(
        np.concatenate([w.q for w in weights]),
        np.concatenate([w.scale for w in weights]),
        offset,
        first.group,
        first.bits,
    )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * weight


class Attention:
    def __init__(self, config: LlamaConfig, w: dict[str, Weight], prefix: str) -> None:
        self.config = config
        names = ("attn_q", "attn_k", "attn_v")
        biases = [w.pop(f"{prefix}.{n}.bias", None) for n in names] if config.qkv_bias else None
        self.qkv = Linear([w.pop(f"{prefix}.{n}.weight") for n in names], biases)
        self.o = Linear([w.pop(f"{prefix}.attn_output.weight")])

    def __call__(
        self,
        x: Tensor,
        norm: tuple[Tensor, float],
        caches: list[Tensor],
        positions: list[Position],
        rope: Tensor,
    ) -> Tensor:
        """x + attention(rms_norm(x)) for x [B, T, dim]: sequence b writes its T new keys and
        values into caches[b] [2, capacity, kv, hd] at positions[b], then attends causally over
        its own cached positions (each sequence has its own kernels and its own length)."""
        c = self.config
        B, T, _ = x.shape
        q, k, v = self.qkv.split(self.qkv(x, norm=norm))
        q = q.reshape(B, T, c.n_heads, c.head_dim)
        k = k.reshape(B, T, c.n_kv_heads, c.head_dim)
        v = v.reshape(B, T, c.n_kv_heads, c.head_dim)
        out = attention.attend(q, k, v, caches, positions, rope, c.n_kv_heads)
        return self.o(out, residual=x)


class FeedForward:
    def __init__(self, w: dict[str, Weight], prefix: str) -> None:
        self.gate_up = Linear([w.pop(f"{prefix}.ffn_gate.weight"), w.pop(f"{prefix}.ffn_up.weight")])
        self.down = Linear([w.pop(f"{prefix}.ffn_down.weight")])

    def __call__(self, x: Tensor, norm: tuple[Tensor, float]) -> Tensor:
        """x + down(silu(gate(rms_norm(x))) * up(rms_norm(x)))"""
        gate, up = self.gate_up.split(self.gate_up(x, norm=norm))
        # one small elementwise kernel: fused into `down`, silu would run once per output row block
        return self.down((gate.silu() * up).contiguous(), residual=x)


class Block:
    def __init__(self, config: LlamaConfig, w: dict[str, Weight], index: int) -> None:
        prefix = f"blk.{index}"
        self.eps = config.norm_eps
        self.attn_norm = from_numpy(np.asarray(w.pop(f"{prefix}.attn_norm.weight"), np.float32))
        self.ffn_norm = from_numpy(np.asarray(w.pop(f"{prefix}.ffn_norm.weight"), np.float32))
        self.attention = Attention(config, w, prefix)
        self.ffn = FeedForward(w, prefix)

    def __call__(self, x, caches, positions, rope) -> Tensor:
        # the norms and residual adds happen inside the projection kernels (see Linear)
        h = self.attention(x, (self.attn_norm, self.eps), caches, positions, rope)
        return self.ffn(h, (self.ffn_norm, self.eps))


class ShardModel:
    """Layers start..end of a model; the last stage also owns the final norm and the head.

    It consumes `weights.tensors`: each array leaves the dict once it is packed into device
    memory, so the load's peak holds each weight unpacked or packed, not both.
    """

    def __init__(self, weights: ShardWeights, start: int, end: int, is_last: bool) -> None:
        c = self.config = weights.config
        w = weights.tensors
        self.blocks = [Block(c, w, i) for i in range(start, end + 1)]
        self.is_last = is_last
        if is_last:
            self.norm = from_numpy(np.asarray(w.pop("output_norm.weight"), np.float32))
            self.head = Linear([w.pop("token_embd.weight" if c.tied_embeddings else "output.weight")])
        self.rope = attention.rope_table(c, c.max_context)

    def new_cache(self, capacity: int) -> list[Tensor]:
        """One request's KV cache: per layer, keys and values for `capacity` positions."""
        c = self.config
        shape = (2, capacity, c.n_kv_heads, c.head_dim)
        return [zeros(shape, own=True) for _ in self.blocks]

    def cache_bytes_per_position(self) -> int:
        c = self.config
        return len(self.blocks) * 2 * c.n_kv_heads * c.head_dim * 4

    def __call__(
        self,
        x: Tensor,
        caches: list[list[Tensor]],
        positions: list[Position],
        last: Position | None = None,
    ) -> Tensor:
        """x [B, T, dim] -> hidden [B, T, dim]; the last stage: logits [B, vocab] at position `last`.

        caches[b] is sequence b's cache (one tensor per layer) and positions[b] where its T new
        positions go; `last` (default T - 1) picks the position whose logits are returned.
        """
        for layer, block in enumerate(self.blocks):
            layer_caches = [cache[layer] for cache in caches]
            # realize per layer: one schedule per layer keeps tinygrad's scheduling fast, and
            # the cache writes never make a later layer recompute an earlier one
            x = block(x, layer_caches, positions, self.rope).realize()
        if not self.is_last:
            return x
        T = x.shape[1]
        pick = T - 1 if last is None else last
        row = x[:, pick : pick + 1, :].reshape(x.shape[0], self.config.dim)
        return self.head(row, norm=(self.norm, self.config.norm_eps))

    def weight_bytes(self) -> int:
        """Bytes of weights this shard holds in memory (KV caches not included)."""
        linears = [lin for blk in self.blocks for lin in (blk.attention.qkv, blk.attention.o)]
        linears += [lin for blk in self.blocks for lin in (blk.ffn.gate_up, blk.ffn.down)]
        total = sum(lin.nbytes for lin in linears)
        total += sum(blk.attn_norm.nbytes() + blk.ffn_norm.nbytes() for blk in self.blocks)
        if self.is_last:
            total += self.head.nbytes + self.norm.nbytes()
        return total
