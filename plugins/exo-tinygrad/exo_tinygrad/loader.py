"""Turning a Llama-family checkpoint (GGUF, or safetensors + config.json) into one shard's weights.

exo-core reads the files (`exo_core.models.checkpoint`: headers, config, the name table,
memory-mapped tensor bytes); this module keeps what is tinygrad's own. It offers only the
tensors the shard needs: the first stage's embedding, its own layers, and the last stage's
final norm and head, under their GGUF names, with GGUF's RoPE row order for q/k undone here,
once, so the model always uses Hugging Face's rotate-half RoPE. No tinygrad in this module.

Nothing is read when a shard is opened: `ShardWeights.tensors` reads a tensor when it is
asked for, and the model asks for one at a time (`Tensors.take`), packing a quantised matrix
straight from the file in row ranges (`Stored.unpack`). So loading never holds a copy of the
whole model in host memory, a layer another shard of the same file already holds is never
read at all (see model.py), and the file pages read are dropped from the process's resident
memory once copied (`_evict`; they stay in the OS page cache).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from exo_core import EngineError, Shard
from exo_core.checkpoint import (
    GGUF_PERMUTED_QK,
    LlamaConfig,
    file_identity,
    ggml_type_name,
    read_gguf,
    read_hf_checkpoint,
    shard_tensors,
    to_hf,
)
from exo_tinygrad import quant

__all__ = ["LlamaConfig", "ShardWeights", "Stored", "Tensors", "Weight", "load_shard", "weight_bytes"]

Weight = np.ndarray | quant.Unpacked


@dataclass
class Stored:
    """A quantised [rows, cols] matrix still in its file, unpacked in row ranges on demand."""

    name: str
    rows: int
    cols: int
    ggml_type: int
    raw: np.ndarray  # uint8 [rows, row bytes], memory-mapped
    perm: np.ndarray | None = None  # row order to read in (GGUF q/k), None: as stored

    @property
    def group(self) -> int:
        return quant.layout(self.ggml_type)[0]

    @property
    def bits(self) -> int:
        return quant.layout(self.ggml_type)[1]

    @property
    def has_offset(self) -> bool:
        return quant.layout(self.ggml_type)[2]

    def unpack(self, start: int = 0, stop: int | None = None) -> quant.Unpacked:
        """Rows start..stop-1 (in the model's row order) as integers plus group parameters."""
        stop = self.rows if stop is None else min(stop, self.rows)
        if self.perm is None:
            raw = np.array(self.raw[start:stop])
        else:
            raw = self.raw[self.perm[start:stop]]
        _evict(self.raw if self.perm is not None else self.raw[start:stop])
        return quant.unpack(raw, self.ggml_type, stop - start, self.cols)


class Tensors(Mapping[str, Weight]):
    """The shard's tensors by GGUF name, each read from the file when it is asked for.

    `tensors[name]` reads the whole tensor (float array or `quant.Unpacked`); `take(name)`
    hands a quantised matrix over as a `Stored` (read later, in parts) and forgets it, which
    is how the model consumes them; `pop` is `take` with the tensor read."""

    def __init__(self, sources: dict[str, Callable[[], np.ndarray | Stored]]) -> None:
        self._sources = sources

    def __getitem__(self, name: str) -> Weight:
        value = self._sources[name]()
        return value.unpack() if isinstance(value, Stored) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def take(self, name: str) -> np.ndarray | Stored:
        return self._sources.pop(name)()

    def pop(self, name: str, *default: Weight | None) -> Weight | None:  # type: ignore[override]
        if name not in self._sources and default:
            return default[0]
        value = self.take(name)
        return value.unpack() if isinstance(value, Stored) else value


@dataclass
class ShardWeights:
    """What one shard needs, ready for the model: config, tensors, and an embedding lookup."""

    config: LlamaConfig
    tensors: Tensors
    embed: Callable[[np.ndarray], np.ndarray] | None  # token ids -> float32 [T, dim] (first stage)
    source: str
    # the file's identity (path, size, modification time): shards with the same one share layers
    identity: tuple | None = None


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
    sources: dict[str, Callable[[], np.ndarray | Stored]] = {}
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
        heads = None
        if permute_qk and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config.n_heads if ".attn_q." in name else config.n_kv_heads
        sources[name] = _source(t, name, heads)
    embed = _embedder(embedding, config) if shard.is_first and embedding is not None else None
    return ShardWeights(config, Tensors(sources), embed, str(path), file_identity(path))


def _source(t: _Tensor, name: str, heads: int | None) -> Callable[[], np.ndarray | Stored]:
    def read() -> np.ndarray | Stored:
        if t.ggml_type in quant.FLOAT_TYPES or len(t.shape) != 2:
            value = _read(t, name)
            _evict(t.raw)
            return _unpermute_rows(value, heads) if heads is not None else value  # type: ignore[return-value]
        rows, cols = t.shape
        perm = _row_permutation(rows, heads) if heads is not None else None
        return Stored(name, rows, cols, t.ggml_type, t.raw.reshape(rows, -1), perm)

    return read


_FAULT_AROUND = 64 << 10


def _evict(view: np.ndarray) -> None:
    """Drop a memory-mapped view's pages from this process's resident memory (they stay in the
    OS page cache; a later read maps them again). Without it the whole file read at load time
    counted in the process's RSS for good. Best effort: nothing happens where it is unsupported."""
    mm = getattr(view, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED") or view.size == 0:
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        start = view.ctypes.data - base
        # with the pages the kernel maps around a faulting one ("fault-around", 64 KB aligned)
        start, end = max(0, start - _FAULT_AROUND), min(start + view.nbytes + _FAULT_AROUND, len(mm))
        aligned = start - start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
    except (OSError, ValueError, TypeError):
        pass


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


def _row_permutation(rows: int, heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's q/k permutation."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(0, 2, 1).reshape(-1)


def _unpermute_rows(value: Weight, heads: int) -> Weight:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half halves)."""
    rows = value.q.shape[0] if isinstance(value, quant.Unpacked) else value.shape[0]
    perm = _row_permutation(rows, heads)
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
        values = quant.dequantize_rows(rows[ids], t.ggml_type, config.dim)
        _evict(rows)  # the pages read (and those mapped around them) leave the RSS
        return values

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
