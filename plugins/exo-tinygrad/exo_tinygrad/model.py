"""A Llama-family transformer shard in tinygrad: RMSNorm, RoPE, grouped-query attention, SwiGLU.

The shard runs layers start..end of a model. Its input is hidden states (the first stage's
embedding lookup happens on the host, see loader.py); its output is hidden states or, on the
last stage, the logits of one chosen position per sequence. Several sequences can run in one
call (a batch of decode steps): the projections see them as one matrix, so the weights are
read once, while each sequence attends over its own KV cache from its own position.

Quantised weights stay quantised in memory; `kernels.matmul` dequantises inside the matmul.
They are packed straight from the file a few rows at a time (`_pack`), so a load holds the
packed weights plus a few MB, never an unpacked copy of the model.

Shards of the same file share their layers: the blocks and the head are kept in a process-wide
table of weak references (`_shared`), so a second shard overlapping a loaded one (layers 0-29
next to 0-14) takes the loaded blocks and reads only the layers it lacks; a block is freed when
no shard holds it any more. KV caches are per request, never shared.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tinygrad import Tensor, UOp, dtypes

from exo_tinygrad import attention, kernels, quant
from exo_tinygrad.buffers import Filled, from_numpy, zeros
from exo_tinygrad.loader import LlamaConfig, ShardWeights, Stored, Weight

Source = Weight | Stored  # what a Linear is built from
# rows unpacked at a time while packing (a multiple of kernels.ROWS): ~1 MB of integers
PACK_ROWS = 1024

Position = int | UOp  # a plain int, or a bound symbolic Variable under the JIT


class Linear:
    """x @ W.T (+ b) for several weights that read the same input (q/k/v, gate/up).

    Consecutive quantised weights of one format share one kernel call; float weights
    (safetensors, F16/F32 GGUF) use tinygrad's own matmul.
    """

    def __init__(self, weights: Sequence[Source], biases: Sequence[np.ndarray | None] | None = None) -> None:
        self.sizes = [_rows(w) for w in weights]
        biases = list(biases or [None] * len(weights))
        self.bias = None
        if any(b is not None for b in biases):
            parts = [
                np.zeros(n, np.float32) if b is None else b for n, b in zip(self.sizes, biases, strict=True)
            ]
            self.bias = from_numpy(np.concatenate(parts).astype(np.float32), own=True)
        self.parts: list[kernels.PackedWeight | Tensor] = []
        for _, run in itertools.groupby(weights, key=_format):
            group = list(run)
            if isinstance(group[0], np.ndarray):  # float16 stays float16; the matmul reads float32
                self.parts.append(from_numpy(np.concatenate(group), own=True))  # type: ignore[arg-type]
            else:
                self.parts.append(_pack(group))  # type: ignore[arg-type]

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


def _format(w: Source) -> tuple:
    if isinstance(w, quant.Unpacked):
        return ("quant", w.bits == 4, w.group, w.offset is None)
    if isinstance(w, Stored):
        return ("quant", w.bits == 4, w.group, not w.has_offset)
    return ("float", str(w.dtype))


def _rows(w: Source) -> int:
    if isinstance(w, Stored):
        return w.rows
    return w.q.shape[0] if isinstance(w, quant.Unpacked) else w.shape[0]


def _unpack(w: Stored | quant.Unpacked, start: int, stop: int) -> quant.Unpacked:
    if isinstance(w, Stored):
        return w.unpack(start, stop)
    off = None if w.offset is None else w.offset[start:stop]
    return quant.Unpacked(w.q[start:stop], w.scale[start:stop], off, w.group, w.bits)


def _pack(weights: Sequence[Stored | quant.Unpacked]) -> kernels.PackedWeight:
    """`kernels.pack` of the weights' rows one after another (same layout, byte for byte),
    written into the device buffers `PACK_ROWS` rows at a time."""
    rows = [_rows(w) for w in weights]
    R = kernels.ROWS
    if any(n % R for n in rows[:-1]):  # a part would not start on a row block: the plain way
        return kernels.pack(_concat([_unpack(w, 0, n) for w, n in zip(weights, rows, strict=True)]))
    first = weights[0]
    cols = first.cols if isinstance(first, Stored) else first.q.shape[1]
    group, bits = first.group, first.bits
    has_offset = first.has_offset if isinstance(first, Stored) else first.offset is not None
    blocks, groups = -(-sum(rows) // R), cols // group
    nibbles = bits == 4
    inner = group // 2 if nibbles else group
    q = Filled(blocks * groups * inner * R, np.dtype(np.uint8 if nibbles else np.int8))
    scale = Filled(blocks * groups * R, np.dtype(np.float32))
    offset = Filled(blocks * groups * R, np.dtype(np.float32)) if has_offset else None
    block = 0
    for w, n in zip(weights, rows, strict=True):
        step = max(R, PACK_ROWS // R * R)
        for start in range(0, n, step):
            u = _unpack(w, start, min(n, start + step))
            count = -(-u.q.shape[0] // R)
            q_part, scale_part, offset_part = kernels.pack_arrays(u)
            q.array[block * groups * inner * R : (block + count) * groups * inner * R] = q_part
            at = slice(block * groups * R, (block + count) * groups * R)
            scale.array[at] = scale_part
            if offset is not None and offset_part is not None:
                offset.array[at] = offset_part
            block += count
    return kernels.PackedWeight(
        q.done(), scale.done(), None if offset is None else offset.done(), sum(rows), cols, group, nibbles
    )


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


Weights = Any  # loader.Tensors, or a plain dict of Weight by GGUF name


def _take(w: Weights, name: str) -> Source:
    """The tensor, taken out of `w` (quantised matrices still unread: `Stored`)."""
    return w.take(name) if hasattr(w, "take") else w.pop(name)


def _norm(w: Weights, name: str) -> Tensor:
    return from_numpy(np.asarray(w.pop(name), np.float32), own=True)


class Attention:
    def __init__(self, config: LlamaConfig, w: Weights, prefix: str) -> None:
        self.config = config
        names = ("attn_q", "attn_k", "attn_v")
        biases = [w.pop(f"{prefix}.{n}.bias", None) for n in names] if config.qkv_bias else None
        self.qkv = Linear([_take(w, f"{prefix}.{n}.weight") for n in names], biases)
        self.o = Linear([_take(w, f"{prefix}.attn_output.weight")])

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
    def __init__(self, w: Weights, prefix: str) -> None:
        self.gate_up = Linear([_take(w, f"{prefix}.ffn_gate.weight"), _take(w, f"{prefix}.ffn_up.weight")])
        self.down = Linear([_take(w, f"{prefix}.ffn_down.weight")])

    def __call__(self, x: Tensor, norm: tuple[Tensor, float]) -> Tensor:
        """x + down(silu(gate(rms_norm(x))) * up(rms_norm(x)))"""
        gate, up = self.gate_up.split(self.gate_up(x, norm=norm))
        # one small elementwise kernel: fused into `down`, silu would run once per output row block
        return self.down((gate.silu() * up).contiguous(), residual=x)


class Block:
    def __init__(self, config: LlamaConfig, w: Weights, index: int) -> None:
        prefix = f"blk.{index}"
        self.eps = config.norm_eps
        self.attn_norm = _norm(w, f"{prefix}.attn_norm.weight")
        self.ffn_norm = _norm(w, f"{prefix}.ffn_norm.weight")
        self.attention = Attention(config, w, prefix)
        self.ffn = FeedForward(w, prefix)

    def __call__(self, x, caches, positions, rope) -> Tensor:
        # the norms and residual adds happen inside the projection kernels (see Linear)
        h = self.attention(x, (self.attn_norm, self.eps), caches, positions, rope)
        return self.ffn(h, (self.ffn_norm, self.eps))

    @property
    def nbytes(self) -> int:
        linears = (self.attention.qkv, self.attention.o, self.ffn.gate_up, self.ffn.down)
        return sum(lin.nbytes for lin in linears) + self.attn_norm.nbytes() + self.ffn_norm.nbytes()


class Output:
    """The last stage's final norm and head."""

    def __init__(self, config: LlamaConfig, w: Weights) -> None:
        self.norm = _norm(w, "output_norm.weight")
        self.head = Linear([_take(w, "token_embd.weight" if config.tied_embeddings else "output.weight")])

    @property
    def nbytes(self) -> int:
        return self.head.nbytes + self.norm.nbytes()


# Blocks and heads of every shard in the process, by (file identity, part): a shard takes the
# ones another shard of the same file holds already. Weak: an entry goes with its last shard.
_shared: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()


def _shared_part(identity: tuple | None, part: tuple, build: Callable[[], Any]) -> Any:
    if identity is None:
        return build()
    key = (identity, *part)
    found = _shared.get(key)
    if found is None:
        found = _shared[key] = build()
    return found


def held_layers(identity: tuple | None) -> set[int]:
    """The layers of the file that some shard of the process holds (and a new shard would share)."""
    return {key[2] for key in list(_shared.keys()) if key[0] == identity and key[1] == "blk"}


def resident_weight_bytes() -> int:
    """Bytes of weights held by every shard model of the process, each shared part once."""
    return sum(part.nbytes for part in list(_shared.values()))


class ShardModel:
    """Layers start..end of a model; the last stage also owns the final norm and the head.

    It takes what it needs from `weights.tensors`, one tensor at a time (see the module
    docstring), and takes the blocks and head that another shard of the same file holds
    already instead of reading them again.
    """

    def __init__(self, weights: ShardWeights, start: int, end: int, is_last: bool) -> None:
        c = self.config = weights.config
        w = weights.tensors
        identity = weights.identity
        self.blocks = [
            _shared_part(identity, ("blk", i), lambda i=i: Block(c, w, i)) for i in range(start, end + 1)
        ]
        self.is_last = is_last
        self.output: Output | None = None
        if is_last:
            self.output = _shared_part(identity, ("output",), lambda: Output(c, w))
        self.rope = attention.rope_table(c, c.max_context)

    @property
    def norm(self) -> Tensor:
        assert self.output is not None
        return self.output.norm

    @property
    def head(self) -> Linear:
        assert self.output is not None
        return self.output.head

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

    def weight_parts(self) -> list[Block | Output]:
        """The weight-holding parts (shared with other shards of the same file where they overlap)."""
        return [*self.blocks, *([self.output] if self.output is not None else [])]

    def weight_bytes(self) -> int:
        """Bytes of weights this shard holds in memory (KV caches not included)."""
        return sum(part.nbytes for part in self.weight_parts())
