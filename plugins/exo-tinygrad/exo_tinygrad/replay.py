"""Replaying a captured TinyJit's CPU kernels with less Python per kernel.

tinygrad's JIT re-runs a captured graph through its generic executor: for every kernel it
resolves parameters, looks the runtime up, evaluates launch dimensions and variable values.
On the CPU backend (no graph runner) that is tens of microseconds of Python per kernel — a
third of a decode step of the 135M model, whose step is ~330 small kernels. `Replay` does that
work once per captured graph: per kernel it keeps the compiled function, the fixed buffer
addresses and where the JIT's inputs and variables go, so a step is a loop of C calls.

It only takes graphs it fully understands (CPU kernels, no threads, no copies); anything else
makes `Replay.build` return None and the TinyJit runs as usual. It reads TinyJit's internals
(tinygrad 0.14), hence the checks; `EXO_TINYGRAD_REPLAY=0` turns it off.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

from tinygrad import Tensor
from tinygrad.device import Buffer
from tinygrad.engine.jit import _prepare_jit_inputs
from tinygrad.engine.realize import _resolve, get_call_arg_uops, get_runtime
from tinygrad.uop.ops import Ops, UOp


@dataclass
class _Kernel:
    fxn: Any  # ctypes function of the compiled kernel
    args: list[Any]  # ctypes.c_uint64 for fixed addresses, ("in", slot) or ("view", uop) per call
    variables: list[str]  # names of the Variables passed after the buffers


def enabled() -> bool:
    return os.environ.get("EXO_TINYGRAD_REPLAY", "1") != "0"


class Replay:
    """Runs a captured TinyJit's kernels directly (see the module docstring)."""

    def __init__(self, jit: Any, kernels: list[_Kernel]) -> None:
        self.jit = jit
        self.kernels = kernels

    @classmethod
    def build(cls, jit: Any) -> Replay | None:
        captured = getattr(jit, "captured", None)
        if captured is None or not enabled():
            return None
        kernels = []
        try:
            for call in captured.linear.src:
                kernel = _plan(call)
                if kernel is None:
                    return None
                kernels.append(kernel)
        except Exception:  # an internal layout this code does not know: let TinyJit run it
            return None
        return cls(jit, kernels)

    def __call__(self, *args: Any) -> Tensor:
        captured = self.jit.captured
        inputs, var_vals, names, info = _prepare_jit_inputs(args, {})
        if names != captured.expected_names or info != captured.expected_input_info:
            return self.jit(*args)  # TinyJit raises the mismatch with its own message
        if any(u in captured._written_uops for u in inputs):
            return self.jit(*args)  # an input the graph also writes: TinyJit copies it first
        addresses = [ctypes.c_uint64(_address(u.buffer)) for u in inputs]
        for k in self.kernels:
            call_args = []
            for a in k.args:
                if isinstance(a, ctypes.c_uint64):
                    call_args.append(a)
                elif a[0] == "in":
                    call_args.append(addresses[a[1]])
                else:  # a view of an input
                    call_args.append(ctypes.c_uint64(_view_address(a[1], inputs)))
            call_args += [ctypes.c_uint64(var_vals[name]) for name in k.variables]
            k.fxn(*call_args)
        self.jit.cnt += 1
        return captured.ret


def _plan(call: UOp) -> _Kernel | None:
    ast = call.src[0]
    if call.op is not Ops.CALL or ast.op is not Ops.PROGRAM:
        return None
    device = call.src[1].device
    if not isinstance(device, str) or not device.startswith("CPU"):
        return None
    runtime = get_runtime(device, ast)
    if getattr(runtime, "lvp", True) or runtime.runtimevars or ast.arg.runtimevars:
        return None
    if tuple(ast.arg.global_size) != (1, 1, 1):
        return None
    arg_uops = get_call_arg_uops(call)
    args: list[Any] = []
    for i in ast.arg.globals:
        u = arg_uops[i]
        if u.op is Ops.PARAM:
            args.append(("in", u.arg.slot))
        elif u.op in (Ops.SHRINK, Ops.MSELECT) and u.src[0].op is Ops.PARAM:
            args.append(("view", u))
        elif not any(x.op is Ops.PARAM for x in u.toposort()):  # the graph's own (planned) buffer
            buffer = u.buffer
            if not isinstance(buffer, Buffer) or buffer.device != device:
                return None
            args.append(ctypes.c_uint64(_address(buffer)))
        else:
            return None
    return _Kernel(runtime.fxn, args, [v.expr for v in ast.arg.vars])


def _address(buffer: Buffer) -> int:
    return buffer.ensure_allocated().get_buf(buffer.device).va_addr


def _view_address(u: UOp, inputs: list[UOp]) -> int:
    return _address(_resolve(u, tuple(inputs)).buffer)
