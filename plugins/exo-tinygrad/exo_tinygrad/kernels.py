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

import math
import os
from dataclasses import dataclass, replace

import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.uop.ops import AxisType, KernelInfo, Ops

from exo_tinygrad import quant
from exo_tinygrad.buffers import from_numpy

ROWS = 8  # output rows per SIMD group


def custom_kernels(device: str) -> bool:
    """Whether the UOp kernels with CPU opts run on `device`. Elsewhere (GPUs) the matmul falls
    back to plain tinygrad ops (dequantise, matmul: tinygrad fuses and parallelises them), and
    the attention kernels run without the CPU opts. `EXO_TINYGRAD_KERNELS=plain` forces the
    fallback (tests check it against the kernels on CPU)."""
    if os.environ.get("EXO_TINYGRAD_KERNELS", "") == "plain":
        return False
    return device.split(":")[0].upper() in ("CPU", "CLANG")


def threads() -> int:
    """CPU threads a kernel is split into (tinygrad's THREAD opt; 1: not split)."""
    if os.environ.get("THREADS", "1") == "0" or not custom_kernels(os.environ.get("DEV", "CPU")):
        return 1
    return max(1, int(os.environ.get("NUM_CPU_THREADS") or os.cpu_count() or 1))


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
    q, scale, offset = pack_arrays(w)
    rows, cols = w.q.shape
    offset_t = None if offset is None else from_numpy(offset)
    return PackedWeight(from_numpy(q), from_numpy(scale), offset_t, rows, cols, w.group, w.bits == 4)


def pack_arrays(w: quant.Unpacked) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`pack`'s reordering in numpy, flat: q, scale, offset of whole row blocks (rows padded
    with zeros to a multiple of ROWS); the loader packs a weight part by part with it."""
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
    if w.bits == 4:  # low nibble: first half of the group, high nibble: second half
        q = q[:, :, : g // 2].astype(np.uint8) | (q[:, :, g // 2 :].astype(np.uint8) << 4)
    else:
        q = q.astype(np.int8)

    def per_group(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32).reshape(blocks, ROWS, groups).transpose(0, 2, 1).reshape(-1)

    return q.reshape(-1), per_group(scale), None if offset is None else per_group(offset)


def _kernel(w: PackedWeight, n_rows: int, norm_eps: float | None, swiglu: bool, residual: bool):
    """The UOp kernel for x [n_rows, in] @ w.T -> [n_rows, out_padded], with optional fusions:

    norm_eps: x is RMS-normalised first (its weight is an extra input; the row's scale is
    computed in the kernel and applied to the sums); swiglu: x holds [gate | up] and the
    input is silu(gate) * up; residual: an extra [n_rows, out] input is added to the result.
    With offsets, an extra [n_rows, groups] input holds each group's sum of the (normed)
    input: computed once by a small kernel, not once per output row block.
    """
    out_blocks = (w.out_features + ROWS - 1) // ROWS
    groups, g = w.in_features // w.group, w.group
    inner = g // 2 if w.nibbles else g
    width = w.in_features * (2 if swiglu else 1)  # row length of x

    def kernel(out: UOp, q: UOp, scale: UOp, *rest: UOp) -> UOp:
        args = [a.flatten() for a in rest]
        offset = args.pop(0) if w.offset is not None else None
        x = args.pop(0)
        group_sums = args.pop(0) if w.offset is not None else None
        norm_w = args.pop(0) if norm_eps is not None else None
        res = args.pop(0) if residual else None
        n = UOp.range(n_rows, 0)
        o = UOp.range(out_blocks, 1)
        r = UOp.range(ROWS, 2)
        b = UOp.range(groups, 3, AxisType.REDUCE)
        j = UOp.range(inner, 4, AxisType.REDUCE)

        def x_at(i: UOp) -> UOp:
            value = x[n * width + i]
            if swiglu:
                up = x[n * width + w.in_features + i]
                value = value * ((value * -1.4426950408889634).exp2() + 1.0).reciprocal() * up
            return value * norm_w[i] if norm_w is not None else value

        byte = q[((o * groups + b) * inner + j) * ROWS + r]
        i = b * g + j
        if w.nibbles:
            x_lo, x_hi = x_at(i), x_at(i + inner)
            lo, hi = (byte & 15).cast(dtypes.float32), (byte >> 4).cast(dtypes.float32)
            dot = (lo * x_lo + hi * x_hi).reduce(j, arg=Ops.ADD)
        else:
            dot = (byte.cast(dtypes.float32) * x_at(i)).reduce(j, arg=Ops.ADD)
        at_group = (o * groups + b) * ROWS + r
        term = dot * scale[at_group]
        if offset is not None and group_sums is not None:
            term = term + offset[at_group] * group_sums[n * groups + b]
        acc = term.reduce(b, arg=Ops.ADD)
        if norm_eps is not None:
            k = UOp.range(w.in_features, 5, AxisType.REDUCE)
            square = x[n * width + k] * x[n * width + k]
            acc = acc * (square.reduce(k, arg=Ops.ADD) * (1.0 / w.in_features) + norm_eps).rsqrt()
        at_out = (n * out_blocks + o) * ROWS + r
        if res is not None:
            acc = acc + res[at_out]
        store = out[at_out].store(acc).end(n, o, r)
        name = _name(w, n_rows) + ("_norm" if norm_eps is not None else "") + ("_swiglu" if swiglu else "")
        return store.sink(
            arg=KernelInfo(name=name + ("_res" if residual else ""), opts_to_apply=_opts(n_rows, out_blocks))
        )

    return kernel


def _opts(n_rows: int, out_blocks: int) -> tuple[Opt, ...]:
    # axes: 0 = token row n, 1 = row block o, 2 = row within block r (size-1 axes are dropped)
    axis_n, axis_o, axis_r = (0, 1, 2) if n_rows > 1 else (None, 0, 1)
    opts = [Opt(OptOps.UPCAST, axis_r, ROWS)]
    parts = threads()
    if parts > 1 and out_blocks % parts == 0:  # each thread takes a contiguous slice of rows
        opts.append(Opt(OptOps.THREAD, axis_o, parts))
        out_blocks //= parts
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


def matmul(
    x: Tensor,
    w: PackedWeight,
    *,
    norm: tuple[Tensor, float] | None = None,
    swiglu: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """x [..., in] float32 -> [..., out] float32 (see `_kernel` for norm / swiglu / residual)."""
    if not custom_kernels(str(x.device)):
        return _matmul_plain(x, w, norm=norm, swiglu=swiglu, residual=residual)
    lead = x.shape[:-1]
    width = w.in_features * (2 if swiglu else 1)
    flat = x.reshape(-1, width)
    n_rows = flat.shape[0]
    if norm is not None and n_rows > 1 and not swiglu:
        # many rows (prefill): normalise once in a small kernel; fused, the norm weight would be
        # applied again for every block of output rows (a quarter of the kernel's time)
        flat = (flat * (flat.square().mean(-1, keepdim=True) + norm[1]).rsqrt() * norm[0]).contiguous()
        norm = None
    out_padded = (w.out_features + ROWS - 1) // ROWS * ROWS
    inputs = [w.q, w.scale, *([w.offset] if w.offset is not None else []), flat]
    if w.offset is not None:  # each group's sum of the input the kernel sees
        xs = flat[:, : w.in_features].silu() * flat[:, w.in_features :] if swiglu else flat
        if norm is not None:
            xs = xs * norm[0]
        inputs.append(xs.reshape(n_rows, w.in_features // w.group, w.group).sum(-1).contiguous())
    if norm is not None:
        inputs.append(norm[0])
    if residual is not None:
        if out_padded != w.out_features:
            raise ValueError("a residual needs an output size that is a multiple of ROWS")
        inputs.append(residual.reshape(n_rows, w.out_features))
    out = Tensor.empty(n_rows * out_padded, dtype=dtypes.float32, device=x.device)
    fxn = _kernel(w, n_rows, None if norm is None else norm[1], swiglu, residual is not None)
    y = out.custom_kernel(*inputs, fxn=fxn)[0].reshape(n_rows, out_padded)
    if out_padded != w.out_features:
        y = y[:, : w.out_features]
    return y.reshape(*lead, w.out_features)


def dequantize(w: PackedWeight) -> Tensor:
    """The weight as float32 [out, in], in plain tinygrad ops (lazy: fused into its use)."""
    blocks, groups = (w.out_features + ROWS - 1) // ROWS, w.in_features // w.group
    inner = w.group // 2 if w.nibbles else w.group
    q = w.q.reshape(blocks, groups, inner, ROWS)
    if w.nibbles:  # low nibbles are the first half of a group, high nibbles the second
        values = (q & 15).cat(q.rshift(4), dim=2).cast(dtypes.float32)
    else:
        values = q.cast(dtypes.float32)
    full = values * w.scale.reshape(blocks, groups, 1, ROWS)
    if w.offset is not None:
        full = full + w.offset.reshape(blocks, groups, 1, ROWS)
    return full.permute(0, 3, 1, 2).reshape(blocks * ROWS, w.in_features)[: w.out_features]


def _matmul_plain(
    x: Tensor,
    w: PackedWeight,
    *,
    norm: tuple[Tensor, float] | None = None,
    swiglu: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """`matmul` in plain tinygrad ops, for devices the UOp kernel's CPU opts do not suit."""
    if swiglu:
        x = x[..., : w.in_features].silu() * x[..., w.in_features :]
    if norm is not None:
        x = x * (x.square().mean(-1, keepdim=True) + norm[1]).rsqrt() * norm[0]
    y = x @ dequantize(w).T
    return y if residual is None else y + residual


# ---- attention scores ---------------------------------------------------------------------


def _call(tensors: list[Tensor], variables: list[UOp | int], fxn) -> Tensor:
    """Tensor.custom_kernel, plus (bound) Variables handed to the kernel as values; returns the
    first tensor (the output) after the kernel."""
    srcs = [t.uop for t in tensors]
    params = [UOp.placeholder_like(u, slot=i) for i, u in enumerate(srcs)]
    extra, values = [], []
    for v in variables:
        if isinstance(v, UOp):
            # param_like would rename the Variable; the JIT hands values over by name
            param = v.param_like(len(srcs) + len(extra))
            values.append(param.replace(arg=replace(param.arg, name=v.unbind()[0].expr)))
            extra.append(v)
        else:
            values.append(v)
    kernel = fxn(*params, *values).call(*srcs, *extra)
    return Tensor(srcs[0].after(kernel))


def _thread_rows(T: int, axis_t: int) -> tuple[Opt, ...]:
    """Split a prefill attention kernel's query rows over the threads (decode has one row)."""
    parts = threads()
    return (Opt(OptOps.THREAD, axis_t, parts),) if T > 1 and parts > 1 and T % parts == 0 else ()


LANES = 8  # attention rows are padded to a multiple of this many positions (SIMD lanes)
LOG2E = 1.4426950408889634


def _padded(pos: UOp | int, T: int) -> UOp | int:
    """pos + T rounded up to a multiple of LANES (a cache capacity is a multiple of it)."""
    return (pos + T + LANES - 1) // LANES * LANES


def attention_scores(q: Tensor, cache: Tensor, pos: UOp | int, b: int, n_kv: int) -> Tensor:
    """Causal attention scores q·k / sqrt(hd) of sequence b, flat [kv, group, T, capacity].

    q [B, T, H, hd] (contiguous, rotated) holds the queries of positions pos..pos+T-1; `cache`
    is the sequence's [2, capacity, kv, hd] (keys first). A query sees the cached positions up
    to its own (-inf after); each row is written up to pos + T rounded up to LANES positions.
    The dot products run as 8 interleaved partial sums: independent SIMD accumulators rather
    than one long dependent chain (tinygrad's own kernel for this matmul with a symbolic
    length is latency-bound).
    """
    _, T, H, hd = q.shape
    cap = cache.shape[1]
    group = H // n_kv
    lanes = 8 if hd % 8 == 0 else 1
    scale = 1.0 / math.sqrt(hd)

    def kernel(scores: UOp, qq: UOp, kk: UOp, pos: UOp | int) -> UOp:
        qq, kk = qq.flatten(), kk.flatten()
        h, g, t = UOp.range(n_kv, 0), UOp.range(group, 1), UOp.range(T, 2)
        s = UOp.range(_padded(pos, T), 3)
        lane = UOp.range(lanes, 4, AxisType.REDUCE)
        step = UOp.range(hd // lanes, 5, AxisType.REDUCE)
        d = step * lanes + lane
        part = (qq[((b * T + t) * H + h * group + g) * hd + d] * kk[(s * n_kv + h) * hd + d]).reduce(
            step, arg=Ops.ADD
        )
        value = (s <= pos + t).where(part.reduce(lane, arg=Ops.ADD) * scale, float("-inf"))
        store = scores[((h * group + g) * T + t) * cap + s].store(value).end(h, g, t, s)
        opts = (Opt(OptOps.UNROLL, 0, lanes),) if lanes > 1 else ()
        opts += _thread_rows(T, sum(n > 1 for n in (n_kv, group)))
        if not custom_kernels(str(q.device)):
            opts = ()
        return store.sink(arg=KernelInfo(name=f"attn_scores_{T}_{H}_{hd}", opts_to_apply=opts))

    out = Tensor.empty(H * T * cap, dtype=dtypes.float32, device=q.device)
    return _call([out, q, cache], [pos], kernel)


def attention_softmax(scores: Tensor, pos: UOp | int, rows: int, T: int, cap: int) -> Tensor:
    """exp(score - row max) for each of the `rows` rows of `attention_scores` (flat [rows, cap],
    valid up to pos + T rounded up to LANES) -> the same layout, not yet divided by the row's
    sum (`attention_values` divides, from the same reads). One kernel: the max loop runs LANES
    positions at a time (independent SIMD partial maxima, not one dependent chain)."""

    def kernel(out: UOp, sc: UOp, pos: UOp | int) -> UOp:
        out, sc = out.flatten(), sc.flatten()
        row = UOp.range(rows, 0)
        blocks = _padded(pos, T) // LANES
        b3, l3 = UOp.range(blocks, 1), UOp.range(LANES, 2)
        b1, l1 = UOp.range(blocks, 3, AxisType.REDUCE), UOp.range(LANES, 4, AxisType.REDUCE)
        at = row * cap

        def x(blk: UOp, lane: UOp) -> UOp:
            return sc[at + blk * LANES + lane]

        peak = x(b1, l1).reduce(b1, arg=Ops.MAX).reduce(l1, arg=Ops.MAX)
        value = ((x(b3, l3) - peak) * LOG2E).exp2()
        store = out[at + b3 * LANES + l3].store(value).end(row, b3, l3)
        opts: tuple[Opt, ...] = ()
        if custom_kernels(str(scores.device)):
            # tinygrad merges the stored (block, lane) pair into one axis: 0 row, 1 position;
            # the reduce axes are (block, lane) twice: unroll each reduction's lanes
            opts = (Opt(OptOps.UNROLL, 0, LANES),)
            parts = threads()
            if parts > 1 and rows % parts == 0:
                opts += (Opt(OptOps.THREAD, 0, parts),)
        return store.sink(arg=KernelInfo(name=f"attn_softmax_{rows}", opts_to_apply=opts))

    out = Tensor.empty(rows * cap, dtype=dtypes.float32, device=scores.device)
    return _call([out, scores], [pos], kernel)


def attention_values(probs: Tensor, cache: Tensor, pos: UOp | int, n_kv: int, group: int, T: int) -> Tensor:
    """sum_s probs[h, g, t, s] * values[s, h] / sum_s probs[h, g, t, s] -> [T, kv * group * hd]
    for one sequence (the softmax's normalisation happens here).

    probs: flat [kv, group, T, capacity] (`attention_softmax`), valid up to pos + T; `cache`
    is the sequence's [2, capacity, kv, hd] (values second). The output dims run as SIMD lanes
    (16 at a time) for 4 query rows at once, so each value row read serves 4 rows.
    """
    cap, hd = cache.shape[1], cache.shape[3]

    def kernel(out: UOp, pp: UOp, vv: UOp, pos: UOp | int) -> UOp:
        out, pp, vv = out.flatten(), pp.flatten(), vv.flatten()
        h, g, t, d = UOp.range(n_kv, 0), UOp.range(group, 1), UOp.range(T, 2), UOp.range(hd, 3)
        s = UOp.range(pos + T, 4, AxisType.REDUCE)
        p = pp[((h * group + g) * T + t) * cap + s]
        acc = (p * vv[((cap + s) * n_kv + h) * hd + d]).reduce(s, arg=Ops.ADD)
        acc = acc * p.reduce(s, arg=Ops.ADD).reciprocal()
        store = out[(t * n_kv * group + h * group + g) * hd + d].store(acc).end(h, g, t, d)
        axis_t = sum(n > 1 for n in (n_kv, group))  # size-1 ranges are dropped
        axis_d = axis_t + (T > 1)
        opts = (Opt(OptOps.UPCAST, axis_d, 16),) if hd % 16 == 0 else ()
        opts += _thread_rows(T, axis_t)
        rows = T // threads() if _thread_rows(T, axis_t) else T
        if T > 1 and rows % 4 == 0:  # 4 query rows share each value row read
            opts += (Opt(OptOps.UPCAST, axis_t, 4),)
        if not custom_kernels(str(probs.device)):
            opts = ()
        return store.sink(arg=KernelInfo(name=f"attn_values_{T}_{hd}", opts_to_apply=opts))

    out = Tensor.empty(T * n_kv * group * hd, dtype=dtypes.float32, device=probs.device)
    return _call([out, probs, cache], [pos], kernel).reshape(T, n_kv * group * hd)
