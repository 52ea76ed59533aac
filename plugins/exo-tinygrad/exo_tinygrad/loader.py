"""Reading a Llama-family checkpoint (GGUF, or safetensors + config.json) for one shard.

The loader only reads the tensors the shard needs: the first stage's embedding, its own
layers, and the last stage's final norm and head. Tensors are returned under one set of
names (GGUF's, the table `HF_NAMES` maps Hugging Face names onto them) either as float
arrays or as `quant.Unpacked` integer groups, with GGUF's RoPE row order for q/k undone here,
once, so the model always uses Hugging Face's rotate-half RoPE. No tinygrad in this module.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exo_core.engine import EngineError
from exo_core.models.shard import Shard
from exo_tinygrad import quant

# Architectures the model file implements (GGUF general.architecture / HF model_type).
LLAMA_FAMILY = ("llama", "mistral", "qwen2")

# Per-layer tensors: GGUF name -> Hugging Face name ({i} is the layer index).
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
OPTIONAL = {"attn_q.bias", "attn_k.bias", "attn_v.bias"}


def hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF-named tensor."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{LAYER_NAMES[rest]}"


@dataclass(frozen=True)
class LlamaConfig:
    """The hyperparameters of a Llama-family model."""

    arch: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_context: int
    qkv_bias: bool = False
    tied_embeddings: bool = False
    # Per-frequency divisors (Llama 3.1 style RoPE scaling), head_dim // 2 values, or None.
    rope_freq_factors: tuple[float, ...] | None = None


Weight = np.ndarray | quant.Unpacked


@dataclass
class ShardWeights:
    """What one shard needs, ready for the model: config, tensors, and an embedding lookup."""

    config: LlamaConfig
    tensors: dict[str, Weight]
    embed: Callable[[np.ndarray], np.ndarray] | None  # token ids -> float32 [T, dim] (first stage)
    source: str


# ---- files ---------------------------------------------------------------------------------


@dataclass
class _Tensor:
    """A tensor inside a file: shape as (rows, cols) or (n,), storage type, raw bytes."""

    shape: tuple[int, ...]
    ggml_type: int  # quant.F32/F16/BF16 or a block format
    raw: np.ndarray  # uint8 view (memory-mapped)
    origin: str  # file, for errors


def needed(shard: Shard, config: LlamaConfig) -> list[str]:
    names = [f"blk.{i}.{rest}" for i in shard.layers for rest in LAYER_NAMES]
    if not config.qkv_bias:
        names = [n for n in names if n.split(".", 2)[2] not in OPTIONAL]
    if shard.is_first:
        names.append("token_embd.weight")
    if shard.is_last:
        names.append("output_norm.weight")
        names.append("token_embd.weight" if config.tied_embeddings else "output.weight")
    return list(dict.fromkeys(names))


def load_shard(path: Path, shard: Shard, max_context: int | None = None) -> ShardWeights:
    """Open a GGUF file or a safetensors directory and read what `shard` needs."""
    path = Path(path)
    if not path.exists():
        raise EngineError(f"{path}: no such file or directory")
    if path.is_dir():
        config, tensors = _open_safetensors(path)
        permute_qk = False
    else:
        config, tensors = _open_gguf(path)
        permute_qk = config.arch in ("llama", "mistral")
    if config.n_layers != shard.n_layers:
        raise EngineError(
            f"{path}: the file has {config.n_layers} layers but the shard {shard} expects {shard.n_layers}"
        )
    if max_context:
        config = _replace(config, max_context=min(config.max_context, max_context))
    out: dict[str, Weight] = {}
    for name in needed(shard, config):
        if name not in tensors:
            raise EngineError(f"{path}: tensor {name} is missing")
        t = tensors[name]
        _check_shape(path, name, t, config)
        if name == "token_embd.weight" and not (shard.is_last and config.tied_embeddings):
            continue  # the first stage looks rows up on the host; nothing to load
        value = _read(t, name)
        if permute_qk and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config.n_heads if ".attn_q." in name else config.n_kv_heads
            value = _unpermute_rows(value, heads)
        out[name] = value
    embed = _embedder(tensors["token_embd.weight"], config) if shard.is_first else None
    return ShardWeights(config, out, embed, str(path))


def _replace(config: LlamaConfig, **changes) -> LlamaConfig:
    from dataclasses import replace

    return replace(config, **changes)


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


def _check_shape(path: Path, name: str, t: _Tensor, c: LlamaConfig) -> None:
    kind = name.split(".", 2)[-1] if name.startswith("blk.") else name
    q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    expected = {
        "attn_norm.weight": (c.dim,),
        "ffn_norm.weight": (c.dim,),
        "output_norm.weight": (c.dim,),
        "attn_q.weight": (q_out, c.dim),
        "attn_k.weight": (kv_out, c.dim),
        "attn_v.weight": (kv_out, c.dim),
        "attn_q.bias": (q_out,),
        "attn_k.bias": (kv_out,),
        "attn_v.bias": (kv_out,),
        "attn_output.weight": (c.dim, q_out),
        "ffn_gate.weight": (c.hidden_dim, c.dim),
        "ffn_up.weight": (c.hidden_dim, c.dim),
        "ffn_down.weight": (c.dim, c.hidden_dim),
        "token_embd.weight": (c.vocab_size, c.dim),
        "output.weight": (c.vocab_size, c.dim),
    }[kind]
    if tuple(t.shape) != expected:
        raise EngineError(f"{path}: tensor {name} has shape {t.shape}, expected {expected}")


# ---- GGUF ----------------------------------------------------------------------------------


def _open_gguf(path: Path) -> tuple[LlamaConfig, dict[str, _Tensor]]:
    try:
        meta, infos, data_start = read_gguf_header(path)
    except (ValueError, EOFError, UnicodeDecodeError, struct.error) as exc:
        raise EngineError(f"{path}: not a complete GGUF file (truncated or corrupt: {exc})") from exc
    arch = str(meta.get("general.architecture", "?"))
    if arch not in LLAMA_FAMILY:
        raise EngineError(
            f"{path}: architecture {arch!r} is not Llama-family; exo-tinygrad runs {', '.join(LLAMA_FAMILY)}"
        )
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors: dict[str, _Tensor] = {}
    for name, dims, ggml_type, offset in infos:
        shape = tuple(reversed(dims))
        cols = dims[0] if dims else 1
        rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        start = data_start + offset
        nbytes = rows * quant.row_bytes(ggml_type, cols) if ggml_type in quant.SUPPORTED else 0
        if start + nbytes > size:
            raise EngineError(
                f"{path}: not a complete GGUF file (tensor {name} ends past the end of the file)"
            )
        tensors[name] = _Tensor(shape, ggml_type, data[start : start + nbytes], str(path))
    config = _gguf_config(path, meta, arch, tensors)
    for name in needed(Shard.whole("check", config.n_layers), config):
        t = tensors.get(name)
        if t is not None and t.ggml_type not in quant.SUPPORTED:
            raise EngineError(
                f"{path}: tensor {name} is stored as {_type_name(t.ggml_type)}, which exo-tinygrad cannot "
                f"read (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)"
            )
    return config, tensors


# GGUF metadata value types: id -> struct format (8 = string, 9 = array)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_header(
    path: Path,
) -> tuple[dict[str, object], list[tuple[str, tuple[int, ...], int, int]], int]:
    """Metadata, tensor infos (name, dims, ggml type, offset) and where tensor data starts.

    Arrays of strings (the vocabulary) are skipped, not decoded: the engine does not need them
    and decoding ~100k strings is most of the cost of opening a GGUF file.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("no GGUF magic number")
        (version,) = struct.unpack("<I", _take(f, 4))
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = struct.unpack("<QQ", _take(f, 16))
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = _read_str(f)
            (kind,) = struct.unpack("<I", _take(f, 4))
            meta[key] = _read_value(f, kind)
        infos = []
        for _ in range(n_tensors):
            name = _read_str(f)
            (n_dims,) = struct.unpack("<I", _take(f, 4))
            dims = struct.unpack(f"<{n_dims}Q", _take(f, 8 * n_dims))
            ggml_type, offset = struct.unpack("<IQ", _take(f, 12))
            infos.append((name, tuple(int(d) for d in dims), int(ggml_type), int(offset)))
        alignment = int(meta.get("general.alignment", 32))  # type: ignore[call-overload]
        data_start = (f.tell() + alignment - 1) // alignment * alignment
    return meta, infos, data_start


def _take(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise EOFError("the file ends inside its header")
    return data


def _read_str(f) -> str:
    (n,) = struct.unpack("<Q", _take(f, 8))
    return _take(f, n).decode("utf-8")


def _read_value(f, kind: int) -> object:
    if kind in _GGUF_SCALARS:
        fmt = "<" + _GGUF_SCALARS[kind]
        return struct.unpack(fmt, _take(f, struct.calcsize(fmt)))[0]
    if kind == 8:
        return _read_str(f)
    if kind == 9:
        (item, count) = struct.unpack("<IQ", _take(f, 12))
        if item in _GGUF_SCALARS:
            size = struct.calcsize("<" + _GGUF_SCALARS[item])
            raw = _take(f, size * count)
            return None if count > 4096 else list(struct.unpack(f"<{count}{_GGUF_SCALARS[item]}", raw))
        if item == 8:
            for _ in range(count):  # skip the strings
                (n,) = struct.unpack("<Q", _take(f, 8))
                f.seek(n, 1)
            return None
        return [_read_value(f, item) for _ in range(count)]
    raise ValueError(f"unknown GGUF metadata type {kind}")


def _type_name(ggml_type: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"ggml type {ggml_type}"


def _gguf_config(path: Path, meta: dict, arch: str, tensors: dict[str, _Tensor]) -> LlamaConfig:
    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise EngineError(f"{path}: metadata {arch}.{key} is missing")
        return value

    dim = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or dim // n_heads)
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count") or head_dim)
    if rope_dim != head_dim:
        raise EngineError(f"{path}: partial RoPE ({rope_dim} of {head_dim} dims) is not supported")
    embd = tensors.get("token_embd.weight")
    vocab = int(meta.get(f"{arch}.vocab_size") or (embd.shape[0] if embd else 0))
    factors = None
    if "rope_freqs.weight" in tensors:
        rf = tensors["rope_freqs.weight"]
        factors = tuple(float(x) for x in quant.dequantize_rows(rf.raw, rf.ggml_type, rf.shape[0])[0])
    elif meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise EngineError(
            f"{path}: RoPE scaling {meta.get(f'{arch}.rope.scaling.type')!r} is not supported by exo-tinygrad"
        )
    return LlamaConfig(
        arch=arch,
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_dim=int(get("feed_forward_length")),
        vocab_size=vocab,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_context=int(get("context_length", 4096)),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        tied_embeddings="output.weight" not in tensors,
        rope_freq_factors=factors,
    )


# ---- safetensors ---------------------------------------------------------------------------

_ST_TYPES = {"F32": quant.F32, "F16": quant.F16, "BF16": quant.BF16}


def _open_safetensors(directory: Path) -> tuple[LlamaConfig, dict[str, _Tensor]]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise EngineError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EngineError(f"{config_file}: not valid JSON ({exc})") from exc
    model_type = str(hf.get("model_type", "?"))
    if model_type not in LLAMA_FAMILY:
        raise EngineError(
            f"{config_file}: model_type {model_type!r} is not Llama-family; "
            f"exo-tinygrad runs {', '.join(LLAMA_FAMILY)}"
        )
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise EngineError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    by_hf: dict[str, _Tensor] = {}
    for file in files:
        by_hf.update(_read_safetensors_header(directory / file))
    tensors = {}
    n_layers = int(hf["num_hidden_layers"])
    for name in [*GLOBAL_NAMES, *(f"blk.{i}.{rest}" for i in range(n_layers) for rest in LAYER_NAMES)]:
        t = by_hf.get(hf_name(name))
        if t is not None:
            tensors[name] = t
    config = _hf_config(directory, hf, tensors)
    return config, tensors


def _read_safetensors_header(file: Path) -> dict[str, _Tensor]:
    """The tensors of one .safetensors file, memory-mapped (format: u64 header size, JSON, data)."""
    if not file.is_file():
        raise EngineError(f"{file}: no such file (listed in model.safetensors.index.json)")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise EngineError(f"{file}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise EngineError(f"{file}: not a complete safetensors file (header runs past the end)")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise EngineError(f"{file}: not a safetensors file ({exc})") from exc
    data = np.memmap(file, dtype=np.uint8, mode="r")
    out: dict[str, _Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        if dtype not in _ST_TYPES:
            raise EngineError(f"{file}: tensor {name} has dtype {dtype}; exo-tinygrad reads F32, F16, BF16")
        start, end = (8 + n + int(x) for x in info["data_offsets"])
        if end > size:
            raise EngineError(f"{file}: not a complete safetensors file ({name} ends past the end)")
        out[name] = _Tensor(
            tuple(int(d) for d in info["shape"]), _ST_TYPES[dtype], data[start:end], str(file)
        )
    return out


def _hf_config(directory: Path, hf: dict, tensors: dict[str, _Tensor]) -> LlamaConfig:
    dim = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or dim // n_heads)
    theta = float(hf.get("rope_theta", 10000.0))
    return LlamaConfig(
        arch=str(hf["model_type"]),
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        hidden_dim=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_context=int(hf.get("max_position_embeddings", 4096)),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        tied_embeddings="output.weight" not in tensors,
        rope_freq_factors=_hf_rope_factors(directory, hf.get("rope_scaling"), head_dim, theta),
    )


def _hf_rope_factors(directory: Path, scaling: dict | None, head_dim: int, theta: float):
    """Llama 3.1's frequency-dependent RoPE scaling as per-frequency divisors (as GGUF stores them)."""
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise EngineError(f"{directory}: RoPE scaling {kind!r} is not supported by exo-tinygrad")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    factors = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


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
