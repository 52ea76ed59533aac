"""GGML block formats unpacked to integers plus per-group scale and offset (numpy only).

Every supported format is read into the same shape: `q` (small integers, one per weight),
`scale` and `offset` per group of `group` consecutive weights in a row, so that

    weight[o, i] = q[o, i] * scale[o, i // group] + offset[o, i // group]

The engine keeps `q` packed in memory (two 4-bit values per byte when they fit) and lets the
matmul kernels do that multiply-add; the embedding lookup uses `dequantize_rows` on the host.
Layouts follow ggml's `ggml-common.h` / `ggml-quants.c`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ggml type ids (gguf.GGMLQuantizationType) of the formats this module reads.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30

# (weights per block, bytes per block) of the block formats.
BLOCK = {
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q8_0: (32, 34),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
}
FLOAT_TYPES = {F32: np.float32, F16: np.float16, BF16: np.uint16}
SUPPORTED = {F32, F16, BF16, *BLOCK}

# (group, bits, has an offset) of what `unpack` returns for each block format
_LAYOUT = {
    Q4_0: (32, 4, True),
    Q4_1: (32, 4, True),
    Q5_0: (32, 5, True),
    Q5_1: (32, 5, True),
    Q8_0: (32, 8, False),
    Q4_K: (32, 4, True),
    Q5_K: (32, 5, True),
    Q6_K: (16, 6, False),
}


def layout(ggml_type: int) -> tuple[int, int, bool]:
    """(group, bits, has an offset) of the `Unpacked` a block format gives, without reading it."""
    return _LAYOUT[ggml_type]


@dataclass
class Unpacked:
    """Integers plus per-group affine parameters; see the module docstring."""

    q: np.ndarray  # [rows, cols] int8 (or uint8 for 0..31)
    scale: np.ndarray  # [rows, cols // group] float32
    offset: np.ndarray | None  # [rows, cols // group] float32, None when zero
    group: int
    bits: int  # how many bits q needs (4: 0..15, else int8 range)

    def dequantize(self) -> np.ndarray:
        rows, cols = self.q.shape
        g = self.q.reshape(rows, cols // self.group, self.group).astype(np.float32)
        w = g * self.scale[..., None]
        if self.offset is not None:
            w += self.offset[..., None]
        return w.reshape(rows, cols)


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 from the last axis of 2 bytes, as float32."""
    return raw.copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: low nibbles first, then high (ggml's 32-block order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: 4 bytes of high bits -> [..., 32] values of 0 or 16."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")  # [..., 32]: bit j is weight j's 5th bit
    return bits << 4


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 packed bytes -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    sc = np.empty((*s.shape[:-1], 8), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def unpack(raw: np.ndarray, ggml_type: int, rows: int, cols: int) -> Unpacked:
    """Unpack `rows` rows of `cols` weights stored as ggml blocks (raw: uint8 [rows, row_bytes])."""
    per_block, nbytes = BLOCK[ggml_type]
    if cols % per_block:
        raise ValueError(f"row length {cols} is not a multiple of the {per_block}-weight block")
    nb = cols // per_block
    b = np.ascontiguousarray(raw).reshape(rows, nb, nbytes)
    if ggml_type == Q8_0:
        q = b[..., 2:].copy().view(np.int8)
        return Unpacked(q.reshape(rows, cols), _f16(b[..., 0:2]), None, 32, 8)
    if ggml_type == Q4_0:
        d = _f16(b[..., 0:2])
        return Unpacked(_nibbles(b[..., 2:]).reshape(rows, cols), d, -8.0 * d, 32, 4)
    if ggml_type == Q4_1:
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        return Unpacked(_nibbles(b[..., 4:]).reshape(rows, cols), d, m, 32, 4)
    if ggml_type in (Q5_0, Q5_1):
        d = _f16(b[..., 0:2])
        off = 2 if ggml_type == Q5_0 else 4
        q = _nibbles(b[..., off + 4 :]) | _high_bits(b[..., off : off + 4])
        m = -16.0 * d if ggml_type == Q5_0 else _f16(b[..., 2:4])
        return Unpacked(q.reshape(rows, cols), d, m, 32, 5)
    if ggml_type in (Q4_K, Q5_K):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scales(b[..., 4:16])
        qs_at = 48 if ggml_type == Q5_K else 16
        qs = b[..., qs_at : qs_at + 128].reshape(rows, nb, 4, 32)
        # each 32-byte chunk holds two 32-weight sub-blocks: low nibbles, then high nibbles
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, nb, 8, 32)
        if ggml_type == Q5_K:
            qh = b[..., 16:48]  # bit k of qh[l] is the 5th bit of sub-block k, weight l
            shifts = np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
            q = q | (((qh[:, :, None, :] >> shifts) & 1) << 4)
        scale = d[..., None] * sc
        offset = -(dmin[..., None] * mn)
        bits = 5 if ggml_type == Q5_K else 4
        return Unpacked(
            q.reshape(rows, cols), scale.reshape(rows, nb * 8), offset.reshape(rows, nb * 8), 32, bits
        )
    if ggml_type == Q6_K:
        ql = b[..., 0:128].reshape(rows, nb, 2, 64)
        qh = b[..., 128:192].reshape(rows, nb, 2, 32)
        sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)  # [rows, nb, 16]
        d = _f16(b[..., 208:210])
        lo = np.stack(
            [ql[..., 0:32] & 0x0F, ql[..., 32:64] & 0x0F, ql[..., 0:32] >> 4, ql[..., 32:64] >> 4], 3
        )
        hi = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], 3)  # [rows, nb, 2, 4, 32]
        q = ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8)
        scale = d[..., None] * sc  # one scale per 16 weights
        return Unpacked(q.reshape(rows, cols), scale.reshape(rows, nb * 16), None, 16, 6)
    raise ValueError(f"ggml type {ggml_type} is not a block format this engine reads")


def dequantize_rows(raw: np.ndarray, ggml_type: int, cols: int) -> np.ndarray:
    """Float32 [rows, cols] from a tensor's raw rows (bytes, or already typed floats, or blocks)."""
    raw = np.ascontiguousarray(raw)
    if ggml_type in FLOAT_TYPES and raw.dtype == np.uint8:
        raw = raw.view(FLOAT_TYPES[ggml_type])
    if ggml_type == F32:
        return raw.astype(np.float32).reshape(-1, cols)
    if ggml_type == F16:
        return raw.view(np.float16).reshape(-1, cols).astype(np.float32)
    if ggml_type == BF16:
        return bf16_to_f32(raw.view(np.uint16)).reshape(-1, cols)
    rows = int(np.asarray(raw).size // (cols // BLOCK[ggml_type][0] * BLOCK[ggml_type][1]))
    return unpack(np.asarray(raw).view(np.uint8), ggml_type, rows, cols).dequantize()


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def row_bytes(ggml_type: int, cols: int) -> int:
    if ggml_type in FLOAT_TYPES:
        return cols * np.dtype(FLOAT_TYPES[ggml_type]).itemsize
    per_block, nbytes = BLOCK[ggml_type]
    return cols // per_block * nbytes
