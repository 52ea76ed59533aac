"""The hyperparameters of a Llama-family model, read from GGUF metadata or a `config.json`.

One `LlamaConfig` serves every engine. Architectures other than llama, mistral and qwen2
are refused here with a `CheckpointError` naming the file; so are RoPE variants no engine
implements (partial rotary dims, yarn, dynamic NTK, ...). What an engine additionally cannot
do (tinygrad has no linear RoPE scaling, say) it refuses itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exo_core.models.checkpoint.errors import CheckpointError
from exo_core.models.checkpoint.gguf import GGUFFile, read_gguf
from exo_core.models.checkpoint.names import HEAD, ROPE_FREQS, module_name
from exo_core.models.checkpoint.safetensors import SafetensorsCheckpoint

# Architectures the engines implement (GGUF general.architecture / config.json model_type).
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# llama.cpp's converter interleaves the q/k rows of these architectures so that its RoPE can
# rotate adjacent pairs; Hugging Face checkpoints (and qwen2 GGUFs) rotate the two halves.
GGUF_PERMUTED_QK = ("llama", "mistral")
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class LlamaConfig:
    """The hyperparameters of a Llama-family model."""

    arch: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # the MLP's inner width
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_context: int
    qkv_bias: bool = False
    tied_embeddings: bool = False
    # Llama 3 long-context RoPE: one divisor per rotated pair (head_dim // 2), as GGUF's
    # rope_freqs tensor stores them: pair i turns at rope_theta ** (-2i / head_dim) / factor[i].
    rope_freq_factors: tuple[float, ...] | None = None
    # Linear RoPE scaling: positions are multiplied by this (1 / the checkpoint's factor).
    rope_position_scale: float = 1.0

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> LlamaConfig:
        """From a GGUF header (its tensor list tells biases, tied head and Llama 3 RoPE apart)."""
        return _from_gguf(gguf)

    @classmethod
    def from_hf(
        cls, config: Mapping[str, Any], *, source: str | Path, tensor_names: Collection[str] | None = None
    ) -> LlamaConfig:
        """From a Hugging Face config.json's fields; `tensor_names` (the checkpoint's, Hugging
        Face names) settle biases and a tied head where the config does not say."""
        return _from_hf(config, str(source), tensor_names)

    def expected_shape(self, tensor: str) -> tuple[int, ...] | None:
        """The numpy shape (rows first) of a GGUF-named tensor; None for names outside the model."""
        return _expected_shape(self, tensor)


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The parsed config.json of a Hugging Face model directory."""
    file = Path(directory) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a Hugging Face model directory)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    return config


def read_hf_checkpoint(directory: str | Path) -> tuple[LlamaConfig, SafetensorsCheckpoint, dict[str, Any]]:
    """A Hugging Face safetensors directory: its config, its tensor index, and config.json as parsed.

    The architecture is checked before the weight files are looked at, so a directory of
    another kind of model says so instead of naming a missing file.
    """
    directory = Path(directory)
    raw = read_hf_config(directory)
    source = directory / CONFIG_FILE
    if raw.get("model_type") not in LLAMA_FAMILY:
        raise _refuse_arch(str(source), "model_type", raw.get("model_type"))
    checkpoint = SafetensorsCheckpoint.open(directory)
    return LlamaConfig.from_hf(raw, source=source, tensor_names=checkpoint.weight_map), checkpoint, raw


def read_llama_config(path: str | Path) -> LlamaConfig:
    """The config of a GGUF file or of a Hugging Face safetensors directory."""
    if Path(path).is_dir():
        return read_hf_checkpoint(path)[0]
    return LlamaConfig.from_gguf(read_gguf(path, string_arrays=False))


def llama3_rope_factors(theta: float, head_dim: int, scaling: Mapping[str, Any]) -> tuple[float, ...]:
    """Llama 3.1's `rope_scaling` (rope_type llama3) as per-pair divisors, as llama.cpp's
    converter writes them into GGUF's rope_freqs: long wavelengths slowed by `factor`, short
    ones kept, the ones between blended."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


def _refuse_arch(source: str, what: str, arch: object) -> CheckpointError:
    return CheckpointError(
        f"{source}: {what} {arch!r} is not Llama-family (exo's engines run {', '.join(LLAMA_FAMILY)})"
    )


def _from_gguf(gguf: GGUFFile) -> LlamaConfig:
    meta, path = gguf.metadata, gguf.path
    arch = meta.get("general.architecture")
    if arch not in LLAMA_FAMILY:
        raise _refuse_arch(str(path), "architecture", arch)

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: metadata {arch}.{key} is missing")
        return value

    dim = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or dim // n_heads)
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count") or head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: partial RoPE ({rope_dim} of {head_dim} dims) is not supported")
    embd = gguf.tensors.get(f"{module_name('token_embd')}.weight")
    vocab = int(meta.get(f"{arch}.vocab_size") or (embd.shape[0] if embd else 0))
    position_scale = 1.0
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        position_scale = 1.0 / float(get("rope.scaling.factor"))
    elif scaling not in (None, "none"):
        raise CheckpointError(
            f"{path}: RoPE scaling {scaling!r} is not supported (exo reads linear and llama3)"
        )
    factors = None
    if ROPE_FREQS in gguf.tensors:
        stored = gguf.tensors[ROPE_FREQS]
        if stored.type_name not in ("F32", "F16") or stored.shape != (head_dim // 2,):
            raise CheckpointError(
                f"{path}: {ROPE_FREQS} is {stored.type_name} {list(stored.shape)}, expected F32 [{head_dim // 2}]"
            )
        factors = tuple(float(x) for x in np.asarray(gguf.tensor_array(ROPE_FREQS), dtype=np.float64))
    return LlamaConfig(
        arch=arch,
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        hidden_dim=int(get("feed_forward_length")),
        vocab_size=vocab,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_context=int(get("context_length", 4096)),
        qkv_bias=f"{module_name('attn_q', 0)}.bias" in gguf.tensors,
        tied_embeddings=f"{module_name(HEAD)}.weight" not in gguf.tensors,
        rope_freq_factors=factors,
        rope_position_scale=position_scale,
    )


def _from_hf(cfg: Mapping[str, Any], source: str, names: Collection[str] | None) -> LlamaConfig:
    model_type = cfg.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise _refuse_arch(source, "model_type", model_type)
    try:
        dim = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or dim // n_heads)
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        factors, position_scale = None, 1.0
        if kind == "linear":
            position_scale = 1.0 / float(scaling["factor"])
        elif kind == "llama3":
            factors = llama3_rope_factors(theta, head_dim, scaling)
        elif kind not in (None, "default"):
            raise CheckpointError(
                f"{source}: RoPE scaling {kind!r} is not supported (exo reads linear and llama3)"
            )
        if names is None:
            qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
            tied = bool(cfg.get("tie_word_embeddings", False))
        else:
            qkv_bias = f"{module_name('attn_q', 0, 'hf')}.bias" in names
            tied = (
                bool(cfg.get("tie_word_embeddings", False))
                or f"{module_name(HEAD, fmt='hf')}.weight" not in names
            )
        return LlamaConfig(
            arch=str(model_type),
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            hidden_dim=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_context=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=qkv_bias,
            tied_embeddings=tied,
            rope_freq_factors=factors,
            rope_position_scale=position_scale,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{source}: a field is missing or malformed ({exc!r})") from exc


def _expected_shape(c: LlamaConfig, tensor: str) -> tuple[int, ...] | None:
    kind = tensor.split(".", 2)[-1] if tensor.startswith("blk.") else tensor
    q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {
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
    }.get(kind)
