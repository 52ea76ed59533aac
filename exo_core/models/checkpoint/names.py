"""The one tensor-name table of Llama-family checkpoints (GGUF <-> Hugging Face), and what a shard needs.

Names here are of modules (`blk.3.attn_q`, `model.layers.3.self_attn.q_proj`); a tensor name
adds `.weight` or `.bias` (MLX-quantised repos add `.scales` and `.biases` too), so selecting
tensors by module keeps every part of a quantised weight together. Modules are called by
their GGUF names in code (`"attn_q"`, `"token_embd"`).
"""

from __future__ import annotations

from typing import Literal

from exo_core.models.shard import Shard

Format = Literal["gguf", "hf"]
GGUF: Format = "gguf"
HF: Format = "hf"

# Per-layer modules: GGUF name (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.").
LAYER_MODULES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Whole-model modules: GGUF name -> Hugging Face name.
GLOBAL_MODULES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
EMBEDDING, FINAL_NORM, HEAD = "token_embd", "output_norm", "output"
# The projections that carry biases in architectures that have them (qwen2).
BIASED_MODULES = ("attn_q", "attn_k", "attn_v")
# Llama 3 RoPE frequency factors: a GGUF-only tensor (Hugging Face keeps them in config.json).
ROPE_FREQS = "rope_freqs.weight"

_HF_GLOBAL = {hf: gguf for gguf, hf in GLOBAL_MODULES.items()}
_HF_LAYER = {hf: gguf for gguf, hf in LAYER_MODULES.items()}


def module_name(module: str, layer: int | None = None, fmt: Format = GGUF) -> str:
    """A module's full name: `module_name("attn_q", 3, HF) == "model.layers.3.self_attn.q_proj"`."""
    if module in GLOBAL_MODULES:
        return module if fmt == GGUF else GLOBAL_MODULES[module]
    if module not in LAYER_MODULES or layer is None:
        raise ValueError(f"{module!r} is not a Llama-family module (or needs a layer index)")
    return f"blk.{layer}.{module}" if fmt == GGUF else f"model.layers.{layer}.{LAYER_MODULES[module]}"


def module_of(tensor: str) -> str:
    """The module a tensor belongs to: `blk.3.attn_q.weight` -> `blk.3.attn_q`."""
    return tensor.rsplit(".", 1)[0]


def to_hf(tensor: str) -> str:
    """The Hugging Face name of a GGUF tensor name (`blk.3.attn_q.bias` -> `model.layers.3....bias`)."""
    module, _, suffix = tensor.rpartition(".")
    if module in GLOBAL_MODULES:
        return f"{GLOBAL_MODULES[module]}.{suffix}"
    blk, layer, rest = module.split(".", 2) if module.count(".") >= 2 else ("", "", "")
    if blk != "blk" or not layer.isdigit() or rest not in LAYER_MODULES:
        raise KeyError(f"{tensor!r} is not a Llama-family GGUF tensor name")
    return f"model.layers.{layer}.{LAYER_MODULES[rest]}.{suffix}"


def to_gguf(tensor: str) -> str | None:
    """The GGUF name of a Hugging Face tensor name; None for tensors outside the table."""
    module, _, suffix = tensor.rpartition(".")
    if module in _HF_GLOBAL:
        return f"{_HF_GLOBAL[module]}.{suffix}"
    if module.startswith("model.layers."):
        layer, _, rest = module.removeprefix("model.layers.").partition(".")
        if layer.isdigit() and rest in _HF_LAYER:
            return f"blk.{layer}.{_HF_LAYER[rest]}.{suffix}"
    return None


def shard_modules(shard: Shard, *, tied: bool, fmt: Format = GGUF) -> list[str]:
    """The modules a shard holds: its layers; the embedding on the first stage; the final norm
    and the head on the last (the embedding again when the head is tied to it)."""
    return [name for _, name in _shard_modules(shard, tied, fmt)]


def shard_tensors(shard: Shard, *, tied: bool, qkv_bias: bool = False, fmt: Format = GGUF) -> list[str]:
    """The tensors a shard needs: each module's `.weight`, and the q/k/v `.bias` when biased."""
    out = []
    for module, name in _shard_modules(shard, tied, fmt):
        out.append(f"{name}.weight")
        if qkv_bias and module in BIASED_MODULES:
            out.append(f"{name}.bias")
    return out


def _shard_modules(shard: Shard, tied: bool, fmt: Format) -> list[tuple[str, str]]:
    """(module, full name) of what the shard holds, layers first."""
    names = [(m, module_name(m, i, fmt)) for i in shard.layers for m in LAYER_MODULES]
    if shard.is_first:
        names.append((EMBEDDING, module_name(EMBEDDING, fmt=fmt)))
    if shard.is_last:
        names.append((FINAL_NORM, module_name(FINAL_NORM, fmt=fmt)))
        head = EMBEDDING if tied else HEAD
        names.append((head, module_name(head, fmt=fmt)))
    return list(dict.fromkeys(names))
