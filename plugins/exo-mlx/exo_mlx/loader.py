"""Loading one shard of a Llama-family model into MLX from GGUF or safetensors files.

Headers, the model config and tensor names come from `exo_core.models.checkpoint`; this
module keeps what is MLX's own: turning the shard's tensors into MLX arrays and layers.
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
norm and head, and the blocks in between. Given the engine's `SharedParts`, a part another
shard of the same file holds already is taken from there, not read again (a shard whose parts
are all held reads nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from exo_core import EngineError, Shard
from exo_core.checkpoint import (
    GGUF,
    GGUF_PERMUTED_QK,
    HF,
    Format,
    LlamaConfig,
    file_identity,
    ggml_type_name,
    module_name,
    module_of,
    read_gguf,
    read_hf_checkpoint,
    shard_modules,
)
from exo_mlx.model import MLP, Attention, Block, Linear, ShardModel, SharedParts

# Architectures this engine implements (its GGUF path has no q/k/v biases and assumes
# llama.cpp's interleaved q/k rows, which qwen2 files do not have).
LLAMA_ARCHITECTURES = ("llama",)

# ggml tensor types mx.load reads: kept quantised, expanded to float16, or dense.
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


def _check(path: Path, config: LlamaConfig, shard: Shard) -> None:
    if config.arch not in LLAMA_ARCHITECTURES:
        raise _fail(
            path, f"architecture {config.arch!r} is not supported (this engine runs {LLAMA_ARCHITECTURES})"
        )
    if config.n_layers != shard.n_layers:
        raise _fail(path, f"the file has {config.n_layers} layers, the model card says {shard.n_layers}")


def rope_periods(config: LlamaConfig) -> mx.array | None:
    """Per-pair RoPE periods for `mx.fast.rope(freqs=...)` under Llama 3 RoPE scaling, else None.

    llama.cpp divides each pair's angle by a factor; `mx.fast.rope` takes each pair's period
    instead: theta^(2i/d) * factor.
    """
    if config.rope_freq_factors is None:
        return None
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    return mx.array((config.rope_theta**exponents * np.asarray(config.rope_freq_factors)).astype(np.float32))


# ---- GGUF ---------------------------------------------------------------------------------


def load_gguf(path: Path, shard: Shard, dtype: mx.Dtype, shared: SharedParts | None = None) -> ShardModel:
    """The shard's tensors from a GGUF file."""
    if not path.is_file():
        raise _fail(path, "the file does not exist")
    gguf = read_gguf(path, string_arrays=False)
    config = LlamaConfig.from_gguf(gguf)
    _check(path, config, shard)
    # Refuse a format mx.load cannot read before any data is read.
    for module in shard_modules(shard, tied=config.tied_embeddings):
        info = gguf.tensors.get(f"{module}.weight")
        if info is not None and info.ggml_type not in GGML_QUANTISED | GGML_DENSE | set(GGML_REQUANTISE_BITS):
            raise _fail(
                path,
                f"tensor {info.name} is {ggml_type_name(info.ggml_type)}, a quantisation this engine does not "
                "read (it reads F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q2_K, Q4_K, Q6_K); "
                "use a Q4_0/Q8_0 GGUF or the model's mlx-community repo",
            )
    loaded: list[dict[str, mx.array]] = []

    def file_arrays() -> dict[str, mx.array]:
        """The file's arrays, read when a tensor is first needed (never, when all are shared)."""
        if not loaded:
            try:
                loaded.append(mx.load(str(path), return_metadata=True)[0])
            except (RuntimeError, ValueError) as exc:
                raise _fail(path, str(exc)) from exc
        return loaded[0]

    def tensor(name: str, required: bool = True) -> Linear | None:
        arrays = file_arrays()
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
        info = gguf.tensors.get(f"{name}.weight")
        requantise = GGML_REQUANTISE_BITS.get(info.ggml_type if info else 0)
        if requantise and weight.ndim == 2:
            q, s, b = mx.quantize(weight, group_size=GGUF_GROUP_SIZE, bits=requantise)
            return Linear(q, s, b, group_size=GGUF_GROUP_SIZE, bits=requantise)
        return Linear(weight.astype(dtype))

    # llama.cpp's converter permutes the q/k rows of Llama checkpoints so that RoPE rotates
    # adjacent pairs; mx.load hands the rows over as stored, so use the adjacent-pair RoPE.
    traditional = config.arch in GGUF_PERMUTED_QK
    # Tensors of other shards are dropped with `loaded` when this returns.
    return _assemble(config, shard, GGUF, tensor, traditional, dtype, shared, file_identity(path))


# ---- safetensors --------------------------------------------------------------------------


def load_safetensors(
    directory: Path, shard: Shard, dtype: mx.Dtype, shared: SharedParts | None = None
) -> ShardModel:
    """The shard's tensors from a Hugging Face / mlx-community directory with config.json."""
    config, checkpoint, raw = read_hf_checkpoint(directory)
    _check(directory, config, shard)
    wanted = set(shard_modules(shard, tied=config.tied_embeddings, fmt=HF))
    arrays: dict[str, mx.array] = {}
    for name in checkpoint.files_for(wanted):
        try:
            # mx.load reads safetensors lazily: only the tensors kept below are ever read.
            loaded = mx.load(str(directory / name))
        except (RuntimeError, ValueError) as exc:
            raise _fail(directory / name, str(exc)) from exc
        arrays.update({k: v for k, v in loaded.items() if module_of(k) in wanted})
    quant = raw.get("quantization") or raw.get("quantization_config") or {}

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

    return _assemble(config, shard, HF, tensor, False, dtype, shared, file_identity(directory))


# ---- assembling a shard -------------------------------------------------------------------


def _assemble(
    config: LlamaConfig,
    shard: Shard,
    fmt: Format,
    tensor: Callable[..., Linear | None],
    rope_traditional: bool,
    dtype: mx.Dtype,
    shared: SharedParts | None = None,
    identity: tuple | None = None,
) -> ShardModel:
    rope_freqs = rope_periods(config)
    taken: list[tuple] = []

    def name(key: str, i: int | None = None) -> str:
        return module_name(key, i, fmt)

    def linear(key: str, i: int | None = None) -> Linear:
        found = tensor(name(key, i))
        assert found is not None  # required tensors raise instead
        return found

    def norm(key: str, i: int | None = None) -> mx.array:
        return linear(key, i).weight.astype(dtype)

    def block(i: int) -> Block:
        q, k, v, o = (linear(m, i) for m in ("attn_q", "attn_k", "attn_v", "attn_output"))
        attention = Attention(config, q, k, v, o, rope_freqs, rope_traditional)
        mlp = MLP(linear("ffn_gate", i), linear("ffn_up", i), linear("ffn_down", i))
        return Block(config, norm("attn_norm", i), attention, norm("ffn_norm", i), mlp)

    def part(kind: tuple, build: Callable[[], Any]) -> Any:
        """A shared part when another shard of the file holds it, else built (and shared)."""
        if shared is None or identity is None:
            return build()
        key = (identity, str(dtype), rope_traditional, *kind)
        found = shared.take(key, build)
        taken.append(key)
        return found

    try:
        blocks = [part(("blk", i), lambda i=i: block(i)) for i in shard.layers]
        embedding = head = final_norm = None
        if shard.is_first:
            embedding = part(("token_embd",), lambda: linear("token_embd"))
        if shard.is_last:
            final_norm = part(("output_norm",), lambda: norm("output_norm"))
            if config.tied_embeddings:
                head = part(("token_embd",), lambda: linear("token_embd"))
            else:
                head = part(
                    ("output",), lambda: tensor(name("output"), required=False) or linear("token_embd")
                )
    except BaseException:
        if shared is not None:
            shared.drop(taken)
        raise
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
    model.shared_keys = taken
    mx.eval(model.arrays())  # read the shard's tensors now, not during the first request
    return model
