"""Turning a Llama-family checkpoint (GGUF, or safetensors + config.json) into one shard's weights.

exo-core reads the files (`exo_core.models.checkpoint`: headers, config, the name table,
memory-mapped tensor bytes); this module keeps what is tinygrad's own. It reads only the
tensors the shard needs: the first stage's embedding, its own layers, and the last stage's
final norm and head. Tensors are returned under their GGUF names, either as float arrays or
as `quant.Unpacked` integer groups, with GGUF's RoPE row order for q/k undone here, once, so
the model always uses Hugging Face's rotate-half RoPE. No tinygrad in this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from exo_core import EngineError, Shard
from exo_core.checkpoint import (
    GGUF_PERMUTED_QK,
    LlamaConfig,
    ggml_type_name,
    read_gguf,
    read_hf_checkpoint,
    shard_tensors,
    to_hf,
)
from exo_tinygrad import quant

__all__ = ["LlamaConfig", "ShardWeights", "Weight", "load_shard", "weight_bytes"]

Weight = np.ndarray | quant.Unpacked


@dataclass
class ShardWeights:
    """What one shard needs, ready for the model: config, tensors, and an embedding lookup."""

    config: LlamaConfig
    tensors: dict[str, Weight]
    embed: Callable[[np.ndarray], np.ndarray] | None  # token ids -> float32 [T, dim] (first stage)
    source: str


@dataclass
class _Tensor:
    """A tensor inside a file: shape as (rows, cols) or (n,), storage type, raw bytes."""

    shape: tuple[int, ...]
    ggml_type: int  # quant.F32/F16/BF16 or a block format
    raw: np.ndarray  # uint8 view (memory-mapped)
    origin: str  # file, for errors


def load_shard(path: Path, shard: Shard, max_context: int | None = None) -> ShardWeights:
    """Open a GGUF file or a safetensors directory and read what `shard` needs."""
    path = Path(path)
    if not path.exists():
        raise EngineError(f"{path}: no such file or directory")
    if path.is_dir():
        config, tensor = _open_safetensors(path)
        permute_qk = False
    else:
        config, tensor = _open_gguf(path)
        permute_qk = config.arch in GGUF_PERMUTED_QK
    if config.rope_position_scale != 1.0:
        raise EngineError(f"{path}: RoPE scaling 'linear' is not supported by exo-tinygrad")
    if config.n_layers != shard.n_layers:
        raise EngineError(
            f"{path}: the file has {config.n_layers} layers but the shard {shard} expects {shard.n_layers}"
        )
    if max_context:
        config = replace(config, max_context=min(config.max_context, max_context))
    out: dict[str, Weight] = {}
    embedding = None
    for name in shard_tensors(shard, tied=config.tied_embeddings, qkv_bias=config.qkv_bias):
        t = tensor(name)
        if tuple(t.shape) != config.expected_shape(name):
            raise EngineError(
                f"{path}: tensor {name} has shape {t.shape}, expected {config.expected_shape(name)}"
            )
        if name == "token_embd.weight":
            embedding = t
            if not (shard.is_last and config.tied_embeddings):
                continue  # the first stage looks rows up on the host; nothing to load
        value = _read(t, name)
        if permute_qk and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config.n_heads if ".attn_q." in name else config.n_kv_heads
            value = _unpermute_rows(value, heads)
        out[name] = value
    embed = _embedder(embedding, config) if shard.is_first and embedding is not None else None
    return ShardWeights(config, out, embed, str(path))


def _read(t: _Tensor, name: str) -> Weight:
    """Float array (1-D tensors and float matrices) or unpacked integer groups."""
    if t.ggml_type in quant.FLOAT_TYPES:
        values = t.raw.view(quant.FLOAT_TYPES[t.ggml_type]).reshape(t.shape)
        if t.ggml_type == quant.BF16:
            return quant.bf16_to_f32(values)
        if t.ggml_type == quant.F16 and len(t.shape) == 2:
            return np.array(values)  # float16 weights stay float16 in memory
        return np.array(values, dtype=np.float32)
    if len(t.shape) != 2:
        raise EngineError(f"{t.origin}: tensor {name} is a quantised vector, which Llama models do not have")
    rows, cols = t.shape
    return quant.unpack(t.raw.reshape(rows, -1), t.ggml_type, rows, cols)


def _unpermute_rows(value: Weight, heads: int) -> Weight:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half halves)."""
    rows = value.q.shape[0] if isinstance(value, quant.Unpacked) else value.shape[0]
    perm = np.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(0, 2, 1).reshape(-1)
    if isinstance(value, quant.Unpacked):
        return quant.Unpacked(
            value.q[perm],
            value.scale[perm],
            None if value.offset is None else value.offset[perm],
            value.group,
            value.bits,
        )
    return value[perm]


def _embedder(t: _Tensor, config: LlamaConfig) -> Callable[[np.ndarray], np.ndarray]:
    rows = t.raw.reshape(t.shape[0], -1)

    def embed(tokens: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= t.shape[0]):
            raise EngineError(f"token id out of range 0..{t.shape[0] - 1}: {ids.tolist()}")
        return quant.dequantize_rows(rows[ids], t.ggml_type, config.dim)

    return embed


_SUPPORTED_NAMES = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K"


def _open_gguf(path: Path) -> tuple[LlamaConfig, Callable[[str], _Tensor]]:
    gguf = read_gguf(path, string_arrays=False)
    config = LlamaConfig.from_gguf(gguf)
    # Refuse an unreadable format whichever shard asks, before any data is read.
    whole = Shard.whole("check", config.n_layers)
    for name in shard_tensors(whole, tied=config.tied_embeddings, qkv_bias=config.qkv_bias):
        info = gguf.tensors.get(name)
        if info is not None and info.ggml_type not in quant.SUPPORTED:
            raise EngineError(
                f"{path}: tensor {name} is stored as {ggml_type_name(info.ggml_type)}, which exo-tinygrad "
                f"cannot read (supported: {_SUPPORTED_NAMES})"
            )

    def tensor(name: str) -> _Tensor:
        info = gguf.tensors.get(name)
        if info is None:
            raise EngineError(f"{path}: tensor {name} is missing")
        return _Tensor(info.shape, info.ggml_type, gguf.tensor_data(name), str(path))

    return config, tensor


_ST_TYPES = {"F32": quant.F32, "F16": quant.F16, "BF16": quant.BF16}


def _open_safetensors(directory: Path) -> tuple[LlamaConfig, Callable[[str], _Tensor]]:
    config, checkpoint, _ = read_hf_checkpoint(directory)

    def tensor(name: str) -> _Tensor:
        info = checkpoint.tensor(to_hf(name))
        if info.dtype not in _ST_TYPES:
            raise EngineError(
                f"{info.file}: tensor {info.name} has dtype {info.dtype}; exo-tinygrad reads F32, F16, BF16"
            )
        return _Tensor(info.shape, _ST_TYPES[info.dtype], checkpoint.tensor_data(info.name), str(info.file))

    return config, tensor


def weight_bytes(tensors: Iterable[Weight]) -> int:
    """Bytes the tensors take once packed for the engine (4-bit values two to a byte)."""
    total = 0
    for w in tensors:
        if isinstance(w, quant.Unpacked):
            per_value = 0.5 if w.bits == 4 else 1
            groups = w.scale.size * (2 if w.offset is not None else 1)
            total += int(w.q.size * per_value) + groups * 4
        else:
            total += w.nbytes
    return total
