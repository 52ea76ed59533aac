"""Matmul kernels on quantised weights, written as tinygrad kernels (UOps) with fixed opts.

    y[n, o] = sum_g scale[o, g] * (sum_j q[o, g, j] * x[n, g, j]) + offset[o, g] * sum_j x[n, g, j]

The weight's integers are read once per call and dequantised in registers inside the loop,
never written out as floats. Rows are stored interleaved in groups of `ROWS` (layout
[out / ROWS, groups, group, ROWS]), so the innermost loop walks contiguous bytes and the C
compiler turns the `ROWS` independent accumulators into SIMD lanes. The opts are set here
rather than searched: tinygrad's generic heuristic picks a much slower loop order for these
kernels, and BEAM search costs minutes per shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

from exo_tinygrad import quant

ROWS = 8  # output rows per SIMD group


@dataclass
class PackedWeight:
    """A quantised [out, in] weight in the kernel's layout."""

    q: Tensor  # uint8 nibble pairs (4-bit) or int8, flat
    scale: Tensor  # float32 [out/ROWS, groups, ROWS], flat
    offset: Tensor | None  # same shape as scale
    out_features: int
    in_features: int
    group: int
    nibbles: bool

    @property
    def nbytes(self) -> int:
        total = self.q.nbytes() + self.scale.nbytes()
        return total + (self.offset.nbytes() if self.offset is not None else 0)


def pack(w: quant.Unpacked) -> PackedWeight:
    """Reorder an unpacked weight into the kernel layout (rows padded to a multiple of ROWS)."""
    rows, cols = w.q.shape
    padded = -rows % ROWS
    q, scale, offset = w.q, w.scale, w.offset
    if padded:
        q = np.concatenate([q, np.zeros((padded, cols), q.dtype)])
        scale = np.concatenate([scale, np.zeros((padded, scale.shape[1]), np.float32)])
        if offset is not None:
            offset = np.concatenate([offset, np.zeros((padded, offset.shape[1]), np.float32)])
    blocks, groups, g = (rows + padded) // ROWS, cols // w.group, w.group
    # [out, in] -> [out/ROWS, groups, group, ROWS]
    q = q.reshape(blocks, ROWS, groups, g).transpose(0, 2, 3, 1)
    nibbles = w.bits == 4
    if nibbles:  # low nibble: first half of the group, high nibble: second half
        q = q[:, :, : g // 2].astype(np.uint8) | (q[:, :, g // 2 :].astype(np.uint8) << 4)
    else:
        q = q.astype(np.int8)

    def per_group(a: np.ndarray) -> Tensor:
        return Tensor(np.ascontiguousarray(a.reshape(blocks, ROWS, groups).transpose(0, 2, 1)).reshape(-1))

    return PackedWeight(
        Tensor(np.ascontiguousarray(q).reshape(-1)),
        per_group(scale.astype(np.float32)),
        None if offset is None else per_group(offset.astype(np.float32)),
        rows,
        cols,
        w.group,
        nibbles,
    )


def _kernel(w: PackedWeight, n_rows: int):
    """The UOp kernel for x [n_rows, in] @ w.T -> [n_rows, out_padded]."""
    out_blocks = (w.out_features + ROWS - 1) // ROWS
    groups, g = w.in_features // w.group, w.group
    inner = g // 2 if w.nibbles else g
    has_offset = w.offset is not None

    def kernel(out: UOp, q: UOp, scale: UOp, *rest: UOp) -> UOp:
        offset, x = (rest[0], rest[1]) if has_offset else (None, rest[0])
        n = UOp.range(n_rows, 0)
        o = UOp.range(out_blocks, 1)
        r = UOp.range(ROWS, 2)
        b = UOp.range(groups, 3, AxisType.REDUCE)
        j = UOp.range(inner, 4, AxisType.REDUCE)
        byte = q[((o * groups + b) * inner + j) * ROWS + r]
        at = n * w.in_features + b * g + j
        if w.nibbles:
            x_lo, x_hi = x[at], x[at + inner]
            dot = ((byte & 15).cast(dtypes.float32) * x_lo + (byte >> 4).cast(dtypes.float32) * x_hi).reduce(
                j, arg=Ops.ADD
            )
            xsum = (x_lo + x_hi).reduce(j, arg=Ops.ADD) if has_offset else None
        else:
            x_j = x[at]
            dot = (byte.cast(dtypes.float32) * x_j).reduce(j, arg=Ops.ADD)
            xsum = x_j.reduce(j, arg=Ops.ADD) if has_offset else None
        at_group = (o * groups + b) * ROWS + r
        term = dot * scale[at_group]
        if offset is not None:
            term = term + offset[at_group] * xsum
        acc = term.reduce(b, arg=Ops.ADD)
        store = out[(n * out_blocks + o) * ROWS + r].store(acc).end(n, o, r)
        return store.sink(arg=KernelInfo(name=_name(w, n_rows), opts_to_apply=_opts(n_rows, out_blocks)))

    return kernel


def _opts(n_rows: int, out_blocks: int) -> tuple[Opt, ...]:
    # axes: 0 = token row n, 1 = row block o, 2 = row within block r (size-1 axes are dropped)
    axis_n, axis_o, axis_r = (0, 1, 2) if n_rows > 1 else (None, 0, 1)
    opts = [Opt(OptOps.UPCAST, axis_r, ROWS)]
    if n_rows == 1:
        for up in (4, 2):
            if out_blocks % up == 0:
                opts.append(Opt(OptOps.UPCAST, axis_o, up))
                break
    else:
        for up in (4, 3, 2):
            if n_rows % up == 0:
                opts.append(Opt(OptOps.UPCAST, axis_n, up))
                break
    return tuple(opts)


def _name(w: PackedWeight, n_rows: int) -> str:
    kind = "q4" if w.nibbles else "q8"
    return f"{kind}mm_{n_rows}_{w.out_features}_{w.in_features}"


def matmul(x: Tensor, w: PackedWeight) -> Tensor:
    """x [..., in] float32 -> [..., out] float32."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, w.in_features).contiguous()
    n_rows = flat.shape[0]
    out_padded = (w.out_features + ROWS - 1) // ROWS * ROWS
    out = Tensor.empty(n_rows * out_padded, dtype=dtypes.float32, device=x.device)
    inputs = [w.q, w.scale, *([w.offset] if w.offset is not None else []), flat.reshape(-1)]
    y = out.custom_kernel(*inputs, fxn=_kernel(w, n_rows))[0].reshape(n_rows, out_padded)
    if out_padded != w.out_features:
        y = y[:, : w.out_features]
    return y.reshape(*lead, w.out_features)
