"""Replaying a captured TinyJit's CPU kernels with less Python per kernel, on several threads.

tinygrad's JIT re-runs a captured graph through its generic executor: for every kernel it
resolves parameters, looks the runtime up, evaluates launch dimensions and variable values.
On the CPU backend (no graph runner) that is tens of microseconds of Python per kernel — a
third of a decode step of the 135M model, whose step is ~330 small kernels — and it runs a
kernel's THREAD parts one after another. `Replay` does that work once per captured graph:
per kernel it keeps the compiled function, the fixed buffer addresses and where the JIT's
inputs and variables go. A step then writes the addresses and values that change into one
argument array and makes one call into `executor.Pool`, which runs every kernel in C with
its parts spread over the threads (or, without the pool, a loop of C calls from Python).

It only takes graphs it fully understands (CPU kernels, no copies); anything else makes
`Replay.build` return None and the TinyJit runs as usual. It reads TinyJit's internals
(tinygrad 0.14), hence the checks; `EXO_TINYGRAD_REPLAY=0` turns it off.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from tinygrad import Tensor
from tinygrad.device import Buffer
from tinygrad.engine.jit import _prepare_jit_inputs
from tinygrad.engine.realize import _resolve, get_call_arg_uops, get_runtime
from tinygrad.uop.ops import Ops, UOp

from exo_tinygrad.executor import Pool, Program


@dataclass
class _Kernel:
    fxn: Any  # ctypes function of the compiled kernel
    runtime: Any  # its tinygrad program, which owns the code's memory: kept alive here
    address: int  # its address
    args: list[Any]  # int (fixed address), ("in", slot), ("view", uop), ("var", name), ("core",) per argument
    parts: int  # THREAD parts (0: not split)
    name: str


def enabled() -> bool:
    return os.environ.get("EXO_TINYGRAD_REPLAY", "1") != "0"


class Replay:
    """Runs a captured TinyJit's kernels directly (see the module docstring)."""

    def __init__(self, jit: Any, kernels: list[_Kernel], pool: Pool | None) -> None:
        self.jit = jit
        self.kernels = kernels
        self.pool = pool
        self.program: Program | None = None
        # per changing argument: its index in the flat argument array, and its source
        self._slots: list[int] = []
        self._sources: list[Any] = []
        if pool is not None:
            calls = []
            for k in kernels:
                fixed = [a if isinstance(a, int) else 0 for a in k.args]
                core = next((i for i, a in enumerate(k.args) if a == ("core",)), 0)
                calls.append((k.address, fixed, k.parts, core))
            self.program = Program(calls)
            for k, offset in zip(kernels, self.program.offsets, strict=True):
                for i, a in enumerate(k.args):
                    if not isinstance(a, int) and a != ("core",):
                        self._slots.append(offset + i)
                        self._sources.append(a)
            self._slot_array = np.asarray(self._slots, dtype=np.int64)
            # each changing slot reads one of a few distinct values: computed once per call
            self._keys = list(dict.fromkeys(self._sources))
            where = {key: i for i, key in enumerate(self._keys)}
            self._key_of_slot = np.asarray([where[a] for a in self._sources], dtype=np.int64)

    @classmethod
    def build(cls, jit: Any, threads: int = 1) -> Replay | None:
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
        pool = Pool.get(threads)
        if pool is None and any(k.parts for k in kernels) and threads > 1:
            pool = None  # parts run one after another from Python (still correct)
        try:
            return cls(jit, kernels, pool)
        except ValueError:  # a kernel the pool cannot call
            return cls(jit, kernels, None)

    def __call__(self, *args: Any) -> Tensor:
        """Called like the TinyJit (its checks of the inputs included)."""
        captured = self.jit.captured
        inputs, var_vals, names, info = _prepare_jit_inputs(args, {})
        if names != captured.expected_names or info != captured.expected_input_info:
            return self.jit(*args)  # TinyJit raises the mismatch with its own message
        if any(u in captured._written_uops for u in inputs):
            return self.jit(*args)  # an input the graph also writes: TinyJit copies it first
        return self._execute(inputs, var_vals)

    def run(self, tensors: list[Tensor], var_vals: dict[str, int]) -> Tensor:
        """The fast call: the JIT's input tensors in its order and the variables' values,
        without TinyJit's checks (the caller passes what the graph was captured with: the
        checks cost ~1 ms a step, a tenth of a decode step)."""
        return self._execute([t.uop.base for t in tensors], var_vals)

    def _execute(self, inputs: list[UOp], var_vals: dict[str, int]) -> Tensor:
        addresses = [_address(u.buffer) for u in inputs]
        views: dict[UOp, int] = {}

        def value(a: Any) -> int:
            kind = a[0]
            if kind == "in":
                return addresses[a[1]]
            if kind == "var":
                return var_vals[a[1]]
            if (address := views.get(a[1])) is None:
                address = views[a[1]] = _view_address(a[1], inputs)
            return address

        if self.program is not None and self.pool is not None:
            values = np.fromiter((value(a) for a in self._keys), dtype=np.uint64, count=len(self._keys))
            self.program.args[self._slot_array] = values[self._key_of_slot]
            self.pool.run(self.program.kernels, self.program.count)
        else:
            for k in self.kernels:
                call_args = [
                    ctypes.c_uint64(a if isinstance(a, int) else 0 if a == ("core",) else value(a))
                    for a in k.args
                ]
                core = next((i for i, a in enumerate(k.args) if a == ("core",)), None)
                for part in range(max(1, k.parts)):
                    if core is not None:
                        call_args[core] = ctypes.c_uint64(part)
                    k.fxn(*call_args)
        self.jit.cnt += 1
        return self.jit.captured.ret


def _plan(call: UOp) -> _Kernel | None:
    ast = call.src[0]
    if call.op is not Ops.CALL or ast.op is not Ops.PROGRAM:
        return None
    device = call.src[1].device
    if not isinstance(device, str) or not device.startswith("CPU"):
        return None
    runtime = get_runtime(device, ast)
    if getattr(runtime, "lvp", True):
        return None
    parts = 0
    if runtime.runtimevars or ast.arg.runtimevars:
        if set(ast.arg.runtimevars) != {"core_id"}:
            return None
        parts = int(ast.arg.global_size[0])
    elif tuple(ast.arg.global_size) != (1, 1, 1):
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
            args.append(_address(buffer))
        else:
            return None
    for v in ast.arg.vars:
        args.append(("core",) if v.expr == "core_id" else ("var", v.expr))
    if parts and ("core",) not in args:
        return None
    address = ctypes.cast(runtime.fxn, ctypes.c_void_p).value or 0
    return _Kernel(runtime.fxn, runtime, address, args, parts, ast.arg.name)


def _address(buffer: Buffer) -> int:
    return buffer.ensure_allocated().get_buf(buffer.device).va_addr


def _view_address(u: UOp, inputs: list[UOp]) -> int:
    return _address(_resolve(u, tuple(inputs)).buffer)
