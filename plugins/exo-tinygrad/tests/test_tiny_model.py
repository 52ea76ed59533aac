"""The engine against a plain numpy transformer written from llama.cpp's conventions.

The reference reads the GGUF's tensors as stored, dequantised by the `gguf` package, and
rotates q/k the way llama.cpp does for each architecture (adjacent pairs for `llama`, whose
q/k rows the converter permuted; halves for `qwen2`), so it checks the loader's row order,
RoPE, grouped-query attention, biases, the head, and the KV cache growing past its first
256 positions, independently of the engine's code.
"""

from __future__ import annotations

import asyncio

import gguf
import numpy as np
import pytest

from exo_core import Shard, StageInput


def reference_logits(path, tokens: list[int], dims: dict, arch: str) -> np.ndarray:
    """Logits of the last position, computed in float64 numpy."""
    reader = gguf.GGUFReader(str(path))
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    heads, kv_heads, dim = dims["heads"], dims["kv_heads"], dims["dim"]
    hd = dim // heads
    T = len(tokens)

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * weight

    def rope(x):  # x [T, n, hd]
        freqs = 10000.0 ** (-np.arange(0, hd, 2) / hd)
        angle = np.arange(T)[:, None, None] * freqs[None, None, :]
        cos, sin = np.cos(angle), np.sin(angle)
        if arch == "llama":  # rotate adjacent pairs (llama.cpp's LLAMA_ROPE_TYPE_NORM)
            a, b = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
            return out
        a, b = x[..., : hd // 2], x[..., hd // 2 :]  # NEOX: halves
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    x = w["token_embd.weight"][tokens]
    for i in range(dims["layers"]):
        p = f"blk.{i}"
        h = norm(x, w[f"{p}.attn_norm.weight"])
        q, k, v = (h @ w[f"{p}.attn_{n}.weight"].T + w.get(f"{p}.attn_{n}.bias", 0) for n in "qkv")
        q, k, v = q.reshape(T, heads, hd), k.reshape(T, kv_heads, hd), v.reshape(T, kv_heads, hd)
        q, k = rope(q), rope(k)
        att = np.zeros((T, heads, hd))
        for head in range(heads):
            kvh = head // (heads // kv_heads)
            scores = q[:, head] @ k[:, kvh].T / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            att[:, head] = (probs / probs.sum(-1, keepdims=True)) @ v[:, kvh]
        x = x + att.reshape(T, dim) @ w[f"{p}.attn_output.weight"].T
        h = norm(x, w[f"{p}.ffn_norm.weight"])
        gate, up = h @ w[f"{p}.ffn_gate.weight"].T, h @ w[f"{p}.ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[f"{p}.ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return norm(x[-1], w["output_norm.weight"]) @ head.T


@pytest.mark.parametrize(
    ("arch", "biases", "tied"), [("llama", False, True), ("qwen2", True, False)], ids=["llama", "qwen2"]
)
def test_engine_matches_numpy_reference(
    tmp_path, tiny_gguf, tiny_card, tiny_dims, load_engine, arch, biases, tied
):
    path = tiny_gguf(tmp_path / f"{arch}.gguf", arch=arch, biases=biases, tied=tied, seed=3)
    card = tiny_card(path)
    shard = Shard.whole(card.id, card.n_layers)
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, tiny_dims["vocab"], 300)]
    engine = load_engine(card)

    async def run() -> tuple[np.ndarray, np.ndarray]:
        first = await engine.forward(shard, StageInput("r", tokens=np.asarray(tokens[:7])))
        out = await engine.forward(shard, StageInput("r", tokens=np.asarray(tokens[7:250]), start_pos=7))
        for pos, t in enumerate(tokens[250:], start=250):  # decode past the first cache capacity (256)
            out = await engine.forward(shard, StageInput("r", tokens=np.asarray([t]), start_pos=pos))
        await engine.close()
        return first.logits, out.logits

    first, last = asyncio.run(run())
    np.testing.assert_allclose(
        first, reference_logits(path, tokens[:7], tiny_dims, arch), rtol=1e-3, atol=1e-3
    )
    np.testing.assert_allclose(last, reference_logits(path, tokens, tiny_dims, arch), rtol=1e-3, atol=1e-3)
