"""Tensors made straight from device buffers, without a tinygrad schedule.

`Tensor(array).realize()` schedules a copy kernel per tensor: a few milliseconds of graph
rewriting each, which for a model's ~400 weight tensors was most of the load time, and for
a new request's 30 KV-cache tensors a visible part of its first token. Here the buffer is
allocated and filled directly (`Buffer.copyin`), which every tinygrad device supports.
"""

from __future__ import annotations

import numpy as np
from tinygrad import Device, Tensor, dtypes
from tinygrad.device import Buffer, BufferSpec
from tinygrad.dtype import DType
from tinygrad.uop.ops import UOp

_DTYPES = {
    np.dtype(np.float32): dtypes.float32,
    np.dtype(np.float16): dtypes.float16,
    np.dtype(np.uint8): dtypes.uint8,
    np.dtype(np.int8): dtypes.int8,
    np.dtype(np.int32): dtypes.int32,
}


def write(buffer: Buffer, data: memoryview) -> None:
    """Copy host bytes into an allocated buffer (the allocator's own copy-in when it has one)."""
    allocator = buffer.allocator
    if hasattr(allocator, "_copyin"):
        allocator._copyin(buffer._buf, data)
    else:
        buffer.copy_from(Buffer("PYTHON", buffer.size, buffer.dtype, opaque=data))


def _tensor(buffer: Buffer, shape: tuple[int, ...]) -> Tensor:
    uop = UOp.from_buffer(buffer, buffer.device)
    return Tensor(uop.reshape(shape) if shape != (buffer.size,) else uop)


def from_numpy(array: np.ndarray, device: str | None = None, *, own: bool = False) -> Tensor:
    """A realized tensor holding a copy of `array` on `device` (default: tinygrad's). `own`:
    memory of its own, as in `zeros` (weights: freed memory goes back to the system)."""
    array = np.ascontiguousarray(array)
    dtype = _DTYPES.get(array.dtype)
    if dtype is None:  # a dtype this helper does not map: tinygrad's own (scheduled) path
        return Tensor(array, device=device).realize()
    options = BufferSpec(nolru=True) if own else None
    device = Device.canonicalize(device or Device.DEFAULT)
    buffer = Buffer(device, max(array.size, 1), dtype, options=options).allocate()
    if array.size:
        write(buffer, memoryview(array.reshape(-1).view(np.uint8)))
    return _tensor(buffer, array.shape)


def zeros(
    shape: tuple[int, ...], dtype: DType = dtypes.float32, device: str | None = None, *, own: bool = False
) -> Tensor:
    """A realized tensor of zeros. `own`: memory of its own, returned to the system when the
    tensor goes (KV caches: tinygrad's allocator would otherwise keep freed buffers for reuse,
    so the caches of past long requests stayed allocated for good)."""
    size = int(np.prod(shape))
    device = Device.canonicalize(device or Device.DEFAULT)
    options = BufferSpec(nolru=True) if own else None
    buffer = Buffer(device, size, dtype, options=options).allocate()
    if not (own and device.split(":")[0] == "CPU"):  # a fresh anonymous mapping is zeroed already
        write(buffer, memoryview(bytearray(size * dtype.itemsize)))
    return _tensor(buffer, shape)


class Filled:
    """A flat tensor of `size` elements of `dtype` (own memory) written in parts through
    `array`: the tensor's memory itself where the device shares host memory, else a host
    staging array copied over by `done`. So a weight packed in parts never exists whole in
    host memory next to its device copy."""

    def __init__(self, size: int, dtype: np.dtype, device: str | None = None) -> None:
        device = Device.canonicalize(device or Device.DEFAULT)
        buffer = Buffer(device, max(size, 1), _DTYPES[np.dtype(dtype)], options=BufferSpec(nolru=True))
        self.tensor = _tensor(buffer.allocate(), (max(size, 1),))
        view = host_view(self.tensor) if device.split(":")[0] == "CPU" else None
        self._staged = view is None
        self.array: np.ndarray = np.zeros(max(size, 1), dtype) if view is None else view.view(dtype)

    def done(self) -> Tensor:
        if self._staged:
            write(self.tensor.uop.buffer, memoryview(self.array.view(np.uint8)))
            self.array = np.zeros(0, self.array.dtype)
        return self.tensor


def host_view(t: Tensor) -> np.ndarray | None:
    """The tensor's memory as a writable numpy array when the device shares host memory
    (the CPU device), else None."""
    buffer = t.uop.buffer
    try:
        view = buffer.as_memoryview(force_zero_copy=True)
    except Exception:  # a device without zero-copy host access
        return None
    return np.frombuffer(view, dtype=np.dtype(t.dtype.fmt or "f")).reshape(t.shape)
