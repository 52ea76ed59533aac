"""K-quant GGUF tensors: mx.load expands them to float16; the loader quantises them again."""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
from exo_mlx.loader import load_gguf
from gguf import quants

from exo_core import Shard

HIDDEN = 256  # K-quant rows are made of 256-value super-blocks


def q4_k_rows(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Q4_K blocks with every sub-block scale 1 and min 0: values d * q, q in 0..15."""
    blocks = np.zeros((rows, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # d
    blocks[:, 2:4] = 0  # dmin
    blocks[:, 4:8] = 1  # 6-bit scales of sub-blocks 0-3
    blocks[:, 8:12] = 0  # mins of sub-blocks 0-3
    blocks[:, 12:16] = 1  # low bits of scales (and mins) of sub-blocks 4-7
    blocks[:, 16:] = rng.integers(0, 256, size=(rows, 128), dtype=np.uint8)  # 4-bit values
    return blocks


def test_q4_k_tensor_is_requantised_to_8_bits(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "q4k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [
        (writer.add_block_count, 1),
        (writer.add_embedding_length, HIDDEN),
        (writer.add_feed_forward_length, HIDDEN),
        (writer.add_head_count, 4),
        (writer.add_head_count_kv, 4),
        (writer.add_context_length, 64),
    ]:
        add(value)
    dense = {
        name: rng.standard_normal(shape).astype(np.float32) * 0.02
        for name, shape in [
            ("token_embd.weight", (32, HIDDEN)),
            ("output_norm.weight", (HIDDEN,)),
            ("blk.0.attn_norm.weight", (HIDDEN,)),
            ("blk.0.ffn_norm.weight", (HIDDEN,)),
            *((f"blk.0.{n}.weight", (HIDDEN, HIDDEN)) for n in ("attn_k", "attn_v", "attn_output")),
            *((f"blk.0.{n}.weight", (HIDDEN, HIDDEN)) for n in ("ffn_gate", "ffn_up", "ffn_down")),
        ]
    }
    for name, array in dense.items():
        writer.add_tensor(name, array)
    raw = q4_k_rows(rng, HIDDEN)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    model = load_gguf(path, Shard.whole("tiny", 1), mx.float32)
    q = model.blocks[0].attention.q
    assert q.quantized and q.bits == 8 and q.group_size == 32
    loaded = np.array(mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=8))
    expected = quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K)
    groups = expected.reshape(HIDDEN, -1, 32)
    half_step = (groups.max(-1) - groups.min(-1)) / 255 / 2  # of MLX's 8-bit grid, per group
    error = np.abs(loaded - expected).reshape(groups.shape).max(-1)
    assert np.all(error <= half_step * 1.01 + 1e-4), error.max()
    assert not model.blocks[0].attention.k.quantized  # F32 tensors stay dense
    out = model(mx.array([[1, 2, 3]]), [model.new_cache(64)])
    assert out.shape == (1, 32) and bool(mx.all(mx.isfinite(out)).item())
