"""Reading GGUF files: the header (metadata, tensor infos, data offset) and tensor bytes by mmap.

This is exo's one GGUF reader; the tokenizer and every engine plugin read through it. It does
not use the `gguf` package (llama.cpp's gguf-py), which is a test-only dependency (its writer
and reference dequantizers check this code): its `GGUFReader` maps every tensor and decodes
the whole vocabulary through numpy records on open, several times slower than this parser
for the header alone, and exo needs nothing else from it at run time. The header is parsed
from an mmap of the file, so opening a multi-GB model reads only its first few MB, and
tensor data is never read until a caller asks for a tensor (`GGUFFile.tensor_data`).

Shapes are numpy's order (rows first): GGUF stores dimensions innermost first, so a
`[vocab, dim]` embedding is written as `ne = (dim, vocab)`; `GGUFTensor.dims` keeps that order.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exo_core.models.checkpoint.errors import CheckpointError

# ggml tensor types (ggml.h `enum ggml_type`): id -> (name, values per block, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
# Element types as numpy dtypes; BF16 comes back as its raw uint16 bits (numpy has no bfloat16).
GGML_NUMPY = {0: "<f4", 1: "<f2", 24: "i1", 25: "<i2", 26: "<i4", 27: "<i8", 28: "<f8", 30: "<u2"}

# GGUF metadata value types: id -> (struct format, size) for scalars, numpy dtype for arrays.
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1"}
_ARRAY_DTYPES |= {10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


class GGUFFormatError(CheckpointError):
    """The file is not a GGUF file, or is cut short or corrupt."""


def ggml_type_name(ggml_type: int) -> str:
    """A ggml type's name: "Q4_K" for 12, "ggml type 99" for an id this reader does not know."""
    known = GGML_TYPES.get(ggml_type)
    return known[0] if known else f"ggml type {ggml_type}"


def ggml_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of this type and shape takes in the file (None for an unknown type)."""
    known = GGML_TYPES.get(ggml_type)
    if known is None:
        return None
    _, per_block, block_bytes = known
    cols = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if cols % per_block:
        return None  # a row must be whole blocks; reported by the caller as corrupt
    return rows * (cols // per_block) * block_bytes


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor lies in the file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: rows first, the contiguous dimension last
    offset: int  # from the start of the file
    nbytes: int | None  # None for a ggml type this reader does not know

    @property
    def dims(self) -> tuple[int, ...]:
        """GGUF's own order (`ne`): the contiguous dimension first."""
        return tuple(reversed(self.shape))

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)


@dataclass
class GGUFFile:
    """A GGUF file's header; `tensor_data` maps tensor bytes on demand."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    data_offset: int  # where tensor data starts (the header's end, aligned)
    alignment: int
    file_size: int
    _data: np.memmap | None = field(default=None, repr=False)

    def tensor_data(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array, memory-mapped (nothing is read yet)."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        if t.nbytes is None:
            raise CheckpointError(f"{self.path}: tensor {name} is of {t.type_name}, which exo cannot read")
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._data[t.offset : t.offset + t.nbytes]

    def tensor_array(self, name: str) -> np.ndarray:
        """Element types (F32, F16, I8, ...) in their shape, BF16 as uint16 bits; block formats
        as uint8 rows of whole blocks, [*shape[:-1], bytes per row]. Memory-mapped."""
        raw = self.tensor_data(name)
        t = self.tensors[name]
        if t.ggml_type in GGML_NUMPY:
            return raw.view(GGML_NUMPY[t.ggml_type]).reshape(t.shape)
        return raw.reshape(*t.shape[:-1], -1)


def read_gguf(path: str | Path, *, string_arrays: bool = True) -> GGUFFile:
    """Parse a GGUF header: metadata, tensor infos, data offset. Tensor data is not read.

    Arrays of numbers come back as lists. `string_arrays=False` leaves arrays of strings (the
    vocabulary and merges, most of the time spent here) out of `metadata`; engines need none.
    Raises `GGUFFormatError` (a `CheckpointError`) naming the file for anything malformed,
    including a tensor that ends past the end of the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if size < 24:
                raise GGUFFormatError(f"{path}: not a GGUF file (too short)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, size, string_arrays)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such file") from exc
    except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as exc:
        raise GGUFFormatError(
            f"{path}: not a complete GGUF file (the header is truncated or corrupt: {exc})"
        ) from exc


class GGUFHeaderIncomplete(GGUFFormatError):
    """The bytes given end inside the header: fetch more of the file's start and parse again."""


def read_gguf_header_bytes(data: bytes, size: int, name: str | Path) -> GGUFFile:
    """Parse a GGUF header from the first bytes of a file of `size` bytes (a download's prefix).

    The header ends at `data_offset`; raises `GGUFHeaderIncomplete` when `data` stops before
    that, and `GGUFFormatError` for anything malformed. `metadata` leaves out string arrays.
    """
    path = Path(name)
    if len(data) < 24 and size >= 24:
        raise GGUFHeaderIncomplete(f"{path}: the header needs more than {len(data)} bytes")
    try:
        parsed = _parse(path, data, size, False)
    except (struct.error, IndexError) as exc:
        if len(data) < size:
            raise GGUFHeaderIncomplete(f"{path}: the header needs more than {len(data)} bytes") from exc
        raise GGUFFormatError(f"{path}: not a complete GGUF file (the header is truncated: {exc})") from exc
    except (UnicodeDecodeError, OverflowError) as exc:
        raise GGUFFormatError(f"{path}: the GGUF header is corrupt ({exc})") from exc
    return parsed


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value pair of a GGUF header, vocabulary included."""
    return read_gguf(path).metadata


def _parse(path: Path, buf: mmap.mmap | bytes, size: int, string_arrays: bool) -> GGUFFile:
    if buf[:4] != b"GGUF":
        raise GGUFFormatError(f"{path}: not a GGUF file (no GGUF magic number)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    pos = 24
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        value, pos = _value(path, buf, pos + 4, vtype, string_arrays)
        if value is not _LEFT_OUT:
            meta[key] = value
    infos = []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(int(d) for d in reversed(dims)), int(ggml_type), int(offset)))
    alignment = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"{path}: general.alignment {alignment} is not a power of two")
    data_offset = -(-pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, shape, ggml_type, offset in infos:
        nbytes = ggml_nbytes(ggml_type, shape)
        if nbytes is None and ggml_type in GGML_TYPES:
            raise GGUFFormatError(
                f"{path}: tensor {name} of shape {shape} is not whole {ggml_type_name(ggml_type)} blocks"
            )
        start = data_offset + offset
        if start + (nbytes or 0) > size:
            raise GGUFFormatError(
                f"{path}: not a complete GGUF file (tensor {name} ends past the end of the file)"
            )
        tensors[name] = GGUFTensor(name, ggml_type, shape, start, nbytes)
    return GGUFFile(path, version, meta, tensors, data_offset, alignment, size)


_LEFT_OUT = object()


def _string(buf: mmap.mmap | bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    if pos + n > len(buf):
        raise IndexError("a string runs past the end of the file")
    return buf[pos : pos + n].decode("utf-8", errors="replace"), pos + n


def _value(path: Path, buf: mmap.mmap | bytes, pos: int, vtype: int, string_arrays: bool) -> tuple[Any, int]:
    if vtype == _STRING:
        return _string(buf, pos)
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + size
    if vtype == _ARRAY:
        etype, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _ARRAY_DTYPES:
            dtype = np.dtype(_ARRAY_DTYPES[etype])
            end = pos + n * dtype.itemsize
            if end > len(buf):
                raise IndexError("an array runs past the end of the file")
            return np.frombuffer(buf, dtype=dtype, count=n, offset=pos).tolist(), end
        if etype == _STRING and not string_arrays:
            for _ in range(n):  # walk over the strings without decoding them
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            if pos > len(buf):
                raise IndexError("an array runs past the end of the file")
            return _LEFT_OUT, pos
        items = []
        for _ in range(n):
            item, pos = _value(path, buf, pos, etype, string_arrays)
            items.append(item)
        return items, pos
    raise GGUFFormatError(f"{path}: unknown GGUF metadata value type {vtype}")
