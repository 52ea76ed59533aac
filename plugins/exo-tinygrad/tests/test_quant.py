"""The block unpackers agree with the gguf package's reference dequantizer on random blocks."""

import gguf
import numpy as np
import pytest
from exo_tinygrad import quant

T = gguf.GGMLQuantizationType
CASES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


def random_blocks(qtype: T, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """Random block bytes whose float16 fields are finite, moderate numbers."""
    rng = np.random.default_rng(seed)
    nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows, blocks_per_row, nbytes), dtype=np.uint8)
    halves = {
        T.Q4_0: [0],
        T.Q4_1: [0, 2],
        T.Q5_0: [0],
        T.Q5_1: [0, 2],
        T.Q8_0: [0],
        T.Q4_K: [0, 2],
        T.Q5_K: [0, 2],
        T.Q6_K: [208],
    }[qtype]
    for at in halves:
        values = rng.uniform(-0.1, 0.1, (rows, blocks_per_row)).astype(np.float16)
        raw[..., at : at + 2] = values.view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, blocks_per_row * nbytes)


@pytest.mark.parametrize("qtype", CASES, ids=lambda t: t.name)
def test_unpack_matches_gguf_reference(qtype):
    rows, blocks = 3, 2
    raw = random_blocks(qtype, rows, blocks, seed=int(qtype))
    cols = blocks * gguf.GGML_QUANT_SIZES[qtype][0]
    expected = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    unpacked = quant.unpack(raw, int(qtype), rows, cols)
    np.testing.assert_allclose(unpacked.dequantize(), expected, rtol=1e-6, atol=1e-7)
    # q fits the bits the packer relies on
    assert unpacked.q.shape == (rows, cols)
    if unpacked.bits == 4:
        assert unpacked.q.min() >= 0 and unpacked.q.max() <= 15


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_dequantize_rows(qtype):
    rng = np.random.default_rng(1)
    cols = 64
    if qtype in (T.F32, T.F16):
        values = rng.standard_normal((4, cols)).astype(np.float32)
        raw = values.astype(np.float16 if qtype == T.F16 else np.float32)
        expected = raw.astype(np.float32)
    elif qtype == T.BF16:
        values = rng.standard_normal((4, cols)).astype(np.float32)
        raw = (values.view(np.uint32) >> 16).astype(np.uint16)
        expected = gguf.quants.dequantize(raw.view(np.uint8), qtype).reshape(4, cols)
    else:
        raw = random_blocks(qtype, 4, cols // 32, seed=7)
        expected = gguf.quants.dequantize(raw, qtype).reshape(4, cols)
    np.testing.assert_allclose(quant.dequantize_rows(raw, int(qtype), cols), expected, rtol=1e-6)
