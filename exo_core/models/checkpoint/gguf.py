"""Reading a GGUF file's key/value metadata quickly (the header only; no tensor data)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

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
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file, or is cut short."""


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value pair of a GGUF header; arrays of numbers come back as lists."""
    path = Path(path)
    data = path.read_bytes() if path.stat().st_size < (1 << 20) else _read_header_bytes(path)
    try:
        return _parse(data)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise GGUFFormatError(f"{path}: GGUF header is truncated or corrupt ({exc})") from exc


def _read_header_bytes(path: Path) -> bytes:
    # Metadata sits at the start; tokenizer vocabularies can make it several MB.
    with path.open("rb") as f:
        head = f.read(64 << 20)
    return head


def _parse(buf: bytes) -> dict[str, Any]:
    if buf[:4] != b"GGUF":
        raise GGUFFormatError("not a GGUF file (bad magic)")
    version = struct.unpack_from("<I", buf, 4)[0]
    if version not in (2, 3):
        raise GGUFFormatError(f"unsupported GGUF version {version}")
    _n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24
    meta: dict[str, Any] = {"GGUF.version": version}
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        meta[key], pos = _value(buf, pos, vtype)
    return meta


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    if pos + n > len(buf):
        raise IndexError("string runs past the end of the data")
    return buf[pos : pos + n].decode("utf-8", errors="replace"), pos + n


def _value(buf: bytes, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype == _STRING:
        return _string(buf, pos)
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + size
    if vtype == _ARRAY:
        etype, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _NUMPY:
            dtype = np.dtype(_NUMPY[etype])
            end = pos + n * dtype.itemsize
            if end > len(buf):
                raise IndexError("array runs past the end of the data")
            return np.frombuffer(buf, dtype=dtype, count=n, offset=pos).tolist(), end
        items = []
        for _ in range(n):
            item, pos = _value(buf, pos, etype)
            items.append(item)
        return items, pos
    raise GGUFFormatError(f"unknown GGUF value type {vtype}")
