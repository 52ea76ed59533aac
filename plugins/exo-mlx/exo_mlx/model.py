"""A Llama-family transformer in MLX that runs one contiguous range of layers.

Config, linear layer (quantised or dense), attention, MLP, block, and the shard model; the
KV cache is explicit and belongs to a request. The first stage owns the embedding, the last
the final norm and output head; a middle stage holds only its own blocks.

Shards of the same model file loaded side by side share their parts (`SharedParts`): a block
does not know its place in a shard (the layer index comes with each call), so layers 0-14 and
0-29 hold one copy of blocks 0-14.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import mlx.core as mx

from exo_core.checkpoint import LlamaConfig


class Linear:
    """y = x W^T, with W dense or quantised (MLX affine: weight, scales, biases per group)."""

    def __init__(
        self,
        weight: mx.array,
        scales: mx.array | None = None,
        biases: mx.array | None = None,
        *,
        group_size: int = 0,
        bits: int = 0,
        bias: mx.array | None = None,
    ) -> None:
        self.weight, self.scales, self.biases = weight, scales, biases
        self.group_size, self.bits = group_size, bits
        self.bias = bias

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def __call__(self, x: mx.array) -> mx.array:
        if self.quantized:
            y = mx.quantized_matmul(
                x,
                self.weight,
                self.scales,
                self.biases,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
            )
        else:
            y = x @ self.weight.T
        return y if self.bias is None else y + self.bias

    def rows(self, ids: mx.array) -> mx.array:
        """Rows of W for the given ids (an embedding lookup), dequantised."""
        if not self.quantized:
            return self.weight[ids]
        return mx.dequantize(
            self.weight[ids],
            self.scales[ids],
            self.biases[ids],
            group_size=self.group_size,
            bits=self.bits,
        )

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.weight, self.scales, self.biases, self.bias) if a is not None]


class KVCache:
    """One request's keys and values for the layers of one shard, grown in steps."""

    step = 256

    def __init__(self, n_layers: int, limit: int) -> None:
        self.limit = limit  # most positions this request may hold
        self.offset = 0  # positions already cached
        self.keys: list[mx.array | None] = [None] * n_layers
        self.values: list[mx.array | None] = [None] * n_layers

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append k, v ([1, n_kv, T, head_dim]) at the current offset; all keys and values so far."""
        t = k.shape[2]
        end = self.offset + t
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None or end > keys.shape[2]:
            capacity = min(self.limit, math.ceil(end / self.step) * self.step)
            grown_k = mx.zeros((1, k.shape[1], capacity, k.shape[3]), dtype=k.dtype)
            grown_v = mx.zeros((1, v.shape[1], capacity, v.shape[3]), dtype=v.dtype)
            if keys is not None and values is not None and self.offset:
                grown_k[:, :, : self.offset] = keys[:, :, : self.offset]
                grown_v[:, :, : self.offset] = values[:, :, : self.offset]
            keys, values = grown_k, grown_v
        keys[:, :, self.offset : end] = k
        values[:, :, self.offset : end] = v
        self.keys[layer], self.values[layer] = keys, values
        return keys[:, :, :end], values[:, :, :end]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.keys, *self.values) if a is not None)


class Attention:
    def __init__(
        self,
        config: LlamaConfig,
        q: Linear,
        k: Linear,
        v: Linear,
        o: Linear,
        rope_freqs: mx.array | None,
        rope_traditional: bool,
    ) -> None:
        self.config = config
        self.q, self.k, self.v, self.o = q, k, v, o
        self.rope_freqs = rope_freqs  # mx.array of per-pair periods, or None for plain rope_theta
        # GGUF files store q/k rows permuted so that RoPE rotates adjacent pairs ("traditional");
        # Hugging Face weights rotate the two halves of each head.
        self.rope_traditional = rope_traditional
        self.scale = config.head_dim**-0.5

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        c = self.config
        return mx.fast.rope(
            x,
            c.head_dim,
            traditional=self.rope_traditional,
            base=None if self.rope_freqs is not None else c.rope_theta,
            scale=c.rope_position_scale,
            offset=offset,
            freqs=self.rope_freqs,
        )

    def __call__(self, x: mx.array, layer: int, caches: list[KVCache]) -> mx.array:
        """x: [B, T, hidden]; B requests (B > 1 only with T == 1), each with its own cache."""
        c = self.config
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, c.n_heads, c.head_dim).transpose(0, 2, 1, 3)
        k = self.k(x).reshape(b, t, c.n_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        v = self.v(x).reshape(b, t, c.n_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        outputs = []
        # Each request attends over its own cache (lengths differ); the projections around
        # this loop are shared, so a batch reads the weights once.
        for i, cache in enumerate(caches):
            qi = self._rope(q[i : i + 1], cache.offset)
            ki = self._rope(k[i : i + 1], cache.offset)
            keys, values = cache.update(layer, ki, v[i : i + 1])
            outputs.append(
                mx.fast.scaled_dot_product_attention(
                    qi, keys, values, scale=self.scale, mask="causal" if t > 1 else None
                )
            )
        out = outputs[0] if b == 1 else mx.concatenate(outputs, axis=0)
        return self.o(out.transpose(0, 2, 1, 3).reshape(b, t, -1))


class MLP:
    def __init__(self, gate: Linear, up: Linear, down: Linear) -> None:
        self.gate, self.up, self.down = gate, up, down

    def __call__(self, x: mx.array) -> mx.array:
        g = self.gate(x)
        return self.down(g * mx.sigmoid(g) * self.up(x))


class Block:
    def __init__(
        self, config: LlamaConfig, attn_norm: mx.array, attention: Attention, mlp_norm: mx.array, mlp: MLP
    ) -> None:
        self.eps = config.norm_eps
        self.attn_norm, self.attention = attn_norm, attention
        self.mlp_norm, self.mlp = mlp_norm, mlp

    def __call__(self, x: mx.array, layer: int, caches: list[KVCache]) -> mx.array:
        h = x + self.attention(mx.fast.rms_norm(x, self.attn_norm, self.eps), layer, caches)
        return h + self.mlp(mx.fast.rms_norm(h, self.mlp_norm, self.eps))

    def arrays(self) -> list[mx.array]:
        a = self.attention
        return [
            self.attn_norm,
            self.mlp_norm,
            *(arr for lin in (a.q, a.k, a.v, a.o) for arr in lin.arrays()),
            *(arr for lin in (self.mlp.gate, self.mlp.up, self.mlp.down) for arr in lin.arrays()),
        ]


class ShardModel:
    """Layers start..end of a Llama model; embedding on the first stage, norm + head on the last."""

    def __init__(
        self,
        config: LlamaConfig,
        blocks: list[Block],
        *,
        embedding: Linear | None,
        norm: mx.array | None,
        head: Linear | None,
        dtype: mx.Dtype = mx.float32,
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.embedding, self.norm, self.head = embedding, norm, head
        self.dtype = dtype  # activations
        self.shared_keys: list[tuple] = []  # the parts taken from a SharedParts (loader.py)

    def new_cache(self, limit: int) -> KVCache:
        return KVCache(len(self.blocks), limit)

    def __call__(self, inputs: mx.array, caches: list[KVCache]) -> mx.array:
        """Token ids [B, T] (first stage) or hidden states [B, T, hidden].

        Returns hidden states [B, T, hidden], or on the last stage the logits of each
        request's last position [B, vocab]. Advances every cache by T.
        """
        if inputs.ndim == 2:
            if self.embedding is None:
                raise ValueError("this stage does not hold the embedding; it takes hidden states")
            x = self.embedding.rows(inputs).astype(self.dtype)
        else:
            x = inputs.astype(self.dtype)
        for layer, block in enumerate(self.blocks):
            x = block(x, layer, caches)
        for cache in caches:
            cache.offset += x.shape[1]
        if self.head is None or self.norm is None:
            return x
        last = mx.fast.rms_norm(x[:, -1, :], self.norm, self.config.norm_eps)
        return self.head(last).astype(mx.float32)

    def arrays(self) -> list[mx.array]:
        arrays = [a for block in self.blocks for a in block.arrays()]
        for part in (self.embedding, self.head if self.head is not self.embedding else None):
            if part is not None:
                arrays.extend(part.arrays())
        if self.norm is not None:
            arrays.append(self.norm)
        return arrays


def part_arrays(part: Any) -> list[mx.array]:
    """The arrays of a shared part: a Block, a Linear or a bare array (a norm)."""
    if isinstance(part, mx.array):
        return [part]
    return part.arrays()


class SharedParts:
    """Weights of the shards one engine holds, each part once: a part (a block, the embedding,
    the head, the final norm, keyed by the model file and dtype) is built the first time a shard
    needs it, handed to every later shard that needs it too, and dropped when the last shard
    holding it is dropped."""

    def __init__(self) -> None:
        self._parts: dict[tuple, list[Any]] = {}  # key -> [part, number of shards holding it]

    def take(self, key: tuple, build: Callable[[], Any]) -> Any:
        held = self._parts.get(key)
        if held is None:
            held = self._parts[key] = [build(), 0]
        held[1] += 1
        return held[0]

    def has(self, key: tuple) -> bool:
        return key in self._parts

    def drop(self, keys: Iterable[tuple]) -> None:
        for key in keys:
            held = self._parts.get(key)
            if held is not None:
                held[1] -= 1
                if held[1] <= 0:
                    del self._parts[key]

    def nbytes(self) -> int:
        """Bytes of every part held (each once)."""
        arrays = {id(a): a for part, _ in self._parts.values() for a in part_arrays(part)}
        return sum(a.nbytes for a in arrays.values())

    def __len__(self) -> int:
        return len(self._parts)
