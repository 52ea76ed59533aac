"""Loading one shard of a Llama-family model into MLX from GGUF or safetensors files.

GGUF goes through `mx.load(path, return_metadata=True)`, which keeps Q4_0, Q4_1 and Q8_0
tensors quantised as MLX affine triples (uint32 `weight`, float16 `scales` and `biases`,
group size 32; the bit width follows from the shapes), so matmuls run `mx.quantized_matmul`.
It expands Q2_K, Q4_K and Q6_K to float16; those are quantised again here (8 bits, group 32)
so a K-quant file takes about twice its size once loaded, not four times. The header is read
first (architecture, tensor types), so a file this engine cannot use fails before its data is
read.

Hugging Face and mlx-community safetensors repos come with a config.json; mlx-community
weights are already MLX-quantised (`quantization` in the config), others are dense.

Only the shard's own tensors are kept: the first stage's embedding, the last stage's final
norm and head, and the blocks in between.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from exo_core.engine import EngineError
from exo_core.models.shard import Shard
from exo_mlx.model import MLP, Attention, Block, Linear, LlamaConfig, ShardModel

# Our name for each tensor -> (GGUF name, Hugging Face name); "{i}" is the layer index.
TENSOR_NAMES: dict[str, tuple[str, str]] = {
    "embed": ("token_embd", "model.embed_tokens"),
    "norm": ("output_norm", "model.norm"),
    "head": ("output", "lm_head"),
    "attn_norm": ("blk.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
    "q": ("blk.{i}.attn_q", "model.layers.{i}.self_attn.q_proj"),
    "k": ("blk.{i}.attn_k", "model.layers.{i}.self_attn.k_proj"),
    "v": ("blk.{i}.attn_v", "model.layers.{i}.self_attn.v_proj"),
    "o": ("blk.{i}.attn_output", "model.layers.{i}.self_attn.o_proj"),
    "mlp_norm": ("blk.{i}.ffn_norm", "model.layers.{i}.post_attention_layernorm"),
    "gate": ("blk.{i}.ffn_gate", "model.layers.{i}.mlp.gate_proj"),
    "up": ("blk.{i}.ffn_up", "model.layers.{i}.mlp.up_proj"),
    "down": ("blk.{i}.ffn_down", "model.layers.{i}.mlp.down_proj"),
}
BLOCK_TENSORS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")
GGUF, HF = 0, 1

LLAMA_ARCHITECTURES = ("llama",)

# ggml tensor types (ggml.h) mx.load reads: kept quantised, expanded to float16, or dense.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0",
}  # fmt: skip
GGML_QUANTISED = {2, 3, 8}  # Q4_0, Q4_1, Q8_0: mx.load keeps these quantised
GGML_DENSE = {0, 1, 30}  # F32, F16, BF16 (mx.load reads BF16 as float16)
# Q2_K, Q4_K, Q6_K: mx.load expands them to float16. Re-quantising with MLX's min/max affine
# scheme at their own width would move values by up to half a step (their sub-block grids do
# not line up with MLX groups), so they become 8-bit: within 1/510 of each group's range.
GGML_REQUANTISE_BITS = {10: 8, 12: 8, 14: 8}
GGUF_GROUP_SIZE = 32


@dataclass
class LoadedShard:
    model: ShardModel
    source: str  # the file or directory the weights came from, for messages


def _fail(path: Path | str, reason: str) -> EngineError:
    return EngineError(f"mlx engine cannot load {path}: {reason}")


# ---- GGUF ---------------------------------------------------------------------------------


@dataclass
class GGUFHeader:
    metadata: dict[str, Any]  # scalars and strings; arrays other than short numeric ones skipped
    tensor_types: dict[str, int]


def read_gguf_header(path: Path) -> GGUFHeader:
    """Metadata and tensor types from a GGUF header, without reading tensor data."""
    with path.open("rb") as f:
        reader = _HeaderReader(f)
        try:
            if reader.read(4) != b"GGUF":
                raise _fail(path, "not a GGUF file (bad magic bytes)")
            version = reader.unpack("<I")
            if version not in (2, 3):
                raise _fail(path, f"unsupported GGUF version {version}")
            n_tensors, n_kv = reader.unpack("<Q"), reader.unpack("<Q")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = reader.string()
                value = reader.value(reader.unpack("<I"))
                if value is not _SKIPPED:
                    metadata[key] = value
            tensor_types: dict[str, int] = {}
            for _ in range(n_tensors):
                name = reader.string()
                n_dims = reader.unpack("<I")
                reader.read(8 * n_dims)  # shape
                tensor_types[name] = reader.unpack("<I")
                reader.read(8)  # offset
        except (struct.error, EOFError, UnicodeDecodeError) as exc:
            raise _fail(path, f"the GGUF header is truncated or corrupt ({exc})") from exc
    return GGUFHeader(metadata, tensor_types)


_SKIPPED = object()
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALAR_FORMATS |= {10: "<Q", 11: "<q", 12: "<d"}


class _HeaderReader:
    def __init__(self, f) -> None:
        self.f = f

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise EOFError("file ends inside the header")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("<Q")).decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALAR_FORMATS:
                size = struct.calcsize(_SCALAR_FORMATS[etype])
                data = self.read(size * n)
                return _SKIPPED if n > 64 else list(struct.unpack(f"<{n}{_SCALAR_FORMATS[etype][1]}", data))
            for _ in range(n):  # arrays of strings (the vocabulary): skip them
                self.value(etype)
            return _SKIPPED
        raise ValueError(f"unknown GGUF value type {vtype}")


def _gguf_config(path: Path, meta: dict[str, Any]) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in LLAMA_ARCHITECTURES:
        raise _fail(
            path, f"architecture {arch!r} is not Llama-family (this engine runs {LLAMA_ARCHITECTURES})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise _fail(path, f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    scaling = meta.get(f"{arch}.rope.scaling.type")
    rope_scale = 1.0
    if scaling == "linear":
        rope_scale = 1.0 / float(get("rope.scaling.factor"))
    elif scaling not in (None, "none"):
        raise _fail(path, f"RoPE scaling {scaling!r} is not supported")
    vocab = meta.get(f"{arch}.vocab_size")
    return LlamaConfig(
        hidden_size=hidden,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        vocab_size=int(vocab) if vocab is not None else 0,  # filled from the embedding below
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        # llama.cpp's converter permutes the q/k rows of Llama checkpoints so that RoPE rotates
        # adjacent pairs; mx.load hands the rows over as stored, so use the adjacent-pair RoPE.
        rope_traditional=True,
        context_length=int(get("context_length", 4096)),
        rope_scale=rope_scale,
    )


def load_gguf(path: Path, shard: Shard, dtype: mx.Dtype) -> ShardModel:
    """The shard's tensors from a GGUF file."""
    if not path.is_file():
        raise _fail(path, "the file does not exist")
    header = read_gguf_header(path)
    config = _gguf_config(path, header.metadata)
    if config.n_layers != shard.n_layers:
        raise _fail(path, f"the file has {config.n_layers} layers, the model card says {shard.n_layers}")
    wanted = _wanted_names(
        shard, GGUF, tied=f"{TENSOR_NAMES['head'][GGUF]}.weight" not in header.tensor_types
    )
    wanted_weights = {f"{name}.weight" for name in wanted} | {"rope_freqs.weight"}
    for name, ggml_type in header.tensor_types.items():
        if name not in wanted_weights:
            continue
        if ggml_type not in GGML_QUANTISED | GGML_DENSE | set(GGML_REQUANTISE_BITS):
            kind = GGML_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")
            raise _fail(
                path,
                f"tensor {name} is {kind}, a quantisation this engine does not read "
                "(it reads F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q2_K, Q4_K, Q6_K); "
                "use a Q4_0/Q8_0 GGUF or the model's mlx-community repo",
            )
    try:
        arrays, _meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as exc:
        raise _fail(path, str(exc)) from exc

    def tensor(name: str, required: bool = True) -> Linear | None:
        weight = arrays.get(f"{name}.weight")
        if weight is None:
            if required:
                raise _fail(path, f"tensor {name}.weight is missing")
            return None
        scales = arrays.get(f"{name}.scales")
        if scales is not None:
            biases = arrays[f"{name}.biases"]
            bits = weight.shape[-1] // scales.shape[-1]  # 32-bit words per group of 32 values
            return Linear(weight, scales, biases, group_size=GGUF_GROUP_SIZE, bits=bits)
        requantise = GGML_REQUANTISE_BITS.get(header.tensor_types.get(f"{name}.weight", 0))
        if requantise and weight.ndim == 2:
            q, s, b = mx.quantize(weight, group_size=GGUF_GROUP_SIZE, bits=requantise)
            return Linear(q, s, b, group_size=GGUF_GROUP_SIZE, bits=requantise)
        return Linear(weight.astype(dtype))

    freqs = None
    if "rope_freqs.weight" in arrays:
        factors = np.array(arrays["rope_freqs.weight"].astype(mx.float32))
        freqs = mx.array(gguf_rope_periods(config.rope_theta, config.head_dim, factors))
    # Tensors of other shards are dropped with `arrays` when this returns.
    return _assemble(config, shard, GGUF, tensor, freqs, dtype)


def gguf_rope_periods(theta: float, head_dim: int, factors: np.ndarray) -> np.ndarray:
    """RoPE periods for MLX from GGUF's `rope_freqs` (Llama 3 long-context RoPE).

    llama.cpp divides each pair's angle by a stored factor; `mx.fast.rope(freqs=...)` takes
    each pair's period instead: theta^(2i/d) * factor.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return (theta**exponents * factors).astype(np.float32)


# ---- safetensors --------------------------------------------------------------------------


def load_safetensors(directory: Path, shard: Shard, dtype: mx.Dtype) -> ShardModel:
    """The shard's tensors from a Hugging Face / mlx-community directory with config.json."""
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise _fail(directory, "there is no config.json")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise _fail(cfg_file, f"config.json is not valid JSON ({exc})") from exc
    config = _hf_config(cfg_file, cfg)
    if config.n_layers != shard.n_layers:
        raise _fail(
            directory, f"the model has {config.n_layers} layers, the model card says {shard.n_layers}"
        )
    index = directory / "model.safetensors.index.json"
    tied = bool(cfg.get("tie_word_embeddings", False))
    weight_map: dict[str, str]
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    else:
        weight_map = {}
        for file in sorted(directory.glob("*.safetensors")):
            weight_map.update(dict.fromkeys(_safetensors_keys(file), file.name))
    if not weight_map:
        raise _fail(directory, "there are no *.safetensors files")
    tied = tied or f"{TENSOR_NAMES['head'][HF]}.weight" not in weight_map
    wanted = _wanted_names(shard, HF, tied=tied)
    files = sorted({weight_map[k] for k in weight_map if k.rsplit(".", 1)[0] in wanted})
    arrays: dict[str, mx.array] = {}
    for name in files:
        try:
            # mx.load reads safetensors lazily: only the tensors kept below are ever read.
            loaded = mx.load(str(directory / name))
        except (RuntimeError, ValueError) as exc:
            raise _fail(directory / name, str(exc)) from exc
        arrays.update({k: v for k, v in loaded.items() if k.rsplit(".", 1)[0] in wanted})
    quant = cfg.get("quantization") or cfg.get("quantization_config") or {}

    def tensor(name: str, required: bool = True) -> Linear | None:
        weight = arrays.get(f"{name}.weight")
        if weight is None:
            if required:
                raise _fail(directory, f"tensor {name}.weight is missing")
            return None
        bias = arrays.get(f"{name}.bias")
        bias = bias.astype(dtype) if bias is not None else None
        scales = arrays.get(f"{name}.scales")
        if scales is None:
            return Linear(weight.astype(dtype), bias=bias)
        override = quant.get(name)
        group_size = int((override if isinstance(override, dict) else quant).get("group_size", 64))
        in_features = scales.shape[-1] * group_size
        bits = weight.shape[-1] * 32 // in_features
        return Linear(weight, scales, arrays[f"{name}.biases"], group_size=group_size, bits=bits, bias=bias)

    return _assemble(config, shard, HF, tensor, _hf_rope_freqs(cfg_file, cfg, config), dtype)


def _safetensors_keys(file: Path) -> list[str]:
    with file.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


def _hf_config(cfg_file: Path, cfg: dict[str, Any]) -> LlamaConfig:
    model_type = cfg.get("model_type")
    if model_type not in LLAMA_ARCHITECTURES:
        raise _fail(
            cfg_file,
            f"model_type {model_type!r} is not Llama-family (this engine runs {LLAMA_ARCHITECTURES})",
        )
    try:
        hidden = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        scaling = cfg.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        rope_scale = 1.0
        if kind == "linear":
            rope_scale = 1.0 / float(scaling["factor"])
        elif kind not in (None, "default", "llama3"):
            raise _fail(cfg_file, f"RoPE scaling {kind!r} is not supported")
        return LlamaConfig(
            hidden_size=hidden,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_traditional=False,
            context_length=int(cfg.get("max_position_embeddings", 4096)),
            rope_scale=rope_scale,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(cfg_file, f"config.json lacks or garbles {exc}") from exc


def _hf_rope_freqs(cfg_file: Path, cfg: dict[str, Any], config: LlamaConfig) -> mx.array | None:
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    try:
        return mx.array(hf_llama3_periods(config.rope_theta, config.head_dim, scaling))
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(cfg_file, f"rope_scaling of type llama3 lacks or garbles {exc}") from exc


def hf_llama3_periods(theta: float, dims: int, scaling: dict[str, Any]) -> np.ndarray:
    """RoPE periods for MLX from `rope_scaling` of type llama3 (transformers' llama3 rule)."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    periods = theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    inv = 1.0 / periods
    wavelen = 2 * np.pi * periods
    smooth = (original / wavelen - low) / (high - low)
    # long wavelengths slowed down by `factor`, short ones kept, the ones between blended
    scaled = np.where(wavelen > original / low, inv / factor, inv)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    scaled = np.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return (1.0 / scaled).astype(np.float32)


# ---- assembling a shard -------------------------------------------------------------------


def _wanted_names(shard: Shard, fmt: int, *, tied: bool) -> set[str]:
    names = {TENSOR_NAMES[t][fmt].format(i=i) for i in shard.layers for t in BLOCK_TENSORS}
    if shard.is_first or (shard.is_last and tied):
        names.add(TENSOR_NAMES["embed"][fmt])
    if shard.is_last:
        names.add(TENSOR_NAMES["norm"][fmt])
        if not tied:
            names.add(TENSOR_NAMES["head"][fmt])
    return names


def _assemble(
    config: LlamaConfig,
    shard: Shard,
    fmt: int,
    tensor: Callable[..., Linear | None],
    rope_freqs: mx.array | None,
    dtype: mx.Dtype,
) -> ShardModel:
    def name(key: str, i: int = 0) -> str:
        return TENSOR_NAMES[key][fmt].format(i=i)

    def linear(key: str, i: int = 0) -> Linear:
        found = tensor(name(key, i))
        assert found is not None  # required tensors raise instead
        return found

    def norm(key: str, i: int = 0) -> mx.array:
        return linear(key, i).weight.astype(dtype)

    blocks = []
    for i in shard.layers:
        attention = Attention(
            config, linear("q", i), linear("k", i), linear("v", i), linear("o", i), rope_freqs
        )
        mlp = MLP(linear("gate", i), linear("up", i), linear("down", i))
        blocks.append(Block(config, norm("attn_norm", i), attention, norm("mlp_norm", i), mlp))
    embedding = head = final_norm = None
    if shard.is_first:
        embedding = linear("embed")
    if shard.is_last:
        final_norm = norm("norm")
        head = tensor(name("head"), required=False) or (embedding or linear("embed"))
    vocab = config.vocab_size
    if head is not None or embedding is not None:
        table = head if head is not None else embedding
        assert table is not None
        vocab = table.weight.shape[0]
    model = ShardModel(
        replace(config, vocab_size=vocab),
        blocks,
        embedding=embedding,
        norm=final_norm,
        head=head,
        dtype=dtype,
    )
    mx.eval(model.arrays())  # read the shard's tensors now, not during the first request
    return model
