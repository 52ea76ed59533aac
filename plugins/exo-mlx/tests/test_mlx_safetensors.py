"""Hugging Face and mlx-community safetensors layouts, made here from the embedded GGUF.

The GGUF's tensors are dequantised, renamed to Hugging Face's names, and their q/k rows put
back in Hugging Face's order (llama.cpp's converter interleaves them for its RoPE): a dense
repo. Quantising that with MLX (8 bits, group 64) gives an mlx-community style repo. Both
must give llama.cpp's greedy answer.
"""

from __future__ import annotations

import asyncio
import json

import mlx.core as mx
import pytest

from exo_core import ModelCard, embedded_gguf_path
from exo_core.checkpoint import GLOBAL_MODULES, LAYER_MODULES, module_name

N_LAYERS, N_HEADS, N_KV_HEADS = 30, 9, 3
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": N_HEADS,
    "num_key_value_heads": N_KV_HEADS,
    "num_hidden_layers": N_LAYERS,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def unpermute(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row interleaving (convert_hf_to_gguf.py `permute`)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def dense_from_gguf() -> dict[str, mx.array]:
    arrays = mx.load(str(embedded_gguf_path()))
    names = [("token_embd", None), ("output_norm", None)]
    names += [(m, i) for i in range(N_LAYERS) for m in LAYER_MODULES]
    assert set(GLOBAL_MODULES) - {m for m, _ in names} == {"output"}  # SmolLM2's head is tied
    out = {}
    for key, i in names:
        src = module_name(key, i)
        w = arrays[f"{src}.weight"]
        if f"{src}.scales" in arrays:
            scales = arrays[f"{src}.scales"]
            bits = w.shape[-1] // scales.shape[-1]
            w = mx.dequantize(w, scales, arrays[f"{src}.biases"], group_size=32, bits=bits)
        w = w.astype(mx.float32)
        if key in ("attn_q", "attn_k"):
            w = unpermute(w, N_HEADS if key == "attn_q" else N_KV_HEADS)
        out[f"{module_name(key, i, 'hf')}.weight"] = w
    return out


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    dense = dense_from_gguf()
    hf_dir = tmp_path_factory.mktemp("hf")
    (hf_dir / "config.json").write_text(json.dumps(CONFIG))
    mx.save_safetensors(str(hf_dir / "model.safetensors"), dense)
    mlx_dir = tmp_path_factory.mktemp("mlx")
    quantised = {}
    for name, w in dense.items():
        if w.ndim == 2:
            base = name.removesuffix(".weight")
            q, s, b = mx.quantize(w, group_size=64, bits=8)
            quantised |= {f"{base}.weight": q, f"{base}.scales": s, f"{base}.biases": b}
        else:
            quantised[name] = w
    (mlx_dir / "config.json").write_text(
        json.dumps({**CONFIG, "quantization": {"group_size": 64, "bits": 8}})
    )
    mx.save_safetensors(str(mlx_dir / "model.safetensors"), quantised)
    return {"safetensors": hf_dir, "mlx": mlx_dir}


@pytest.mark.parametrize("kind", ["safetensors", "mlx"])
def test_repo_gives_llamacpp_answer(kit, repos, reference, kind):
    card = ModelCard("smollm2-135m", "SmolLM2", N_LAYERS, {kind: str(repos[kind])})
    engine = kit.load_engine(card, 0, N_LAYERS - 1)
    try:
        model = engine._model
        assert model.blocks[0].attention.q.quantized == (kind == "mlx")
        assert not model.blocks[0].attention.rope_traditional
        chat = reference["greedy"][1]
        stages = [(engine, kit.shard_of(card, 0, N_LAYERS - 1))]
        assert asyncio.run(kit.greedy(stages, chat["prompt_ids"])) == kit.expected_answer(chat)
    finally:
        asyncio.run(engine.close())
