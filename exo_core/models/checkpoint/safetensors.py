"""Reading safetensors checkpoints: file headers, the sharded index, and tensor bytes by mmap.

A `.safetensors` file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, byte range within the data; an optional `__metadata__`), then the data. A
sharded checkpoint adds `model.safetensors.index.json`, whose `weight_map` says which file
holds each tensor, so a stage can fetch and open only the files holding its own tensors.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exo_core.models.checkpoint.errors import CheckpointError
from exo_core.models.checkpoint.names import module_of

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# dtype -> numpy dtype of its elements (BF16 and the 8-bit floats as their raw bits).
DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "U64": "<u8",
    "I32": "<i4",
    "U32": "<u4",
    "I16": "<i2",
    "U16": "<u2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "u1",
    "F8_E4M3": "u1",
    "F8_E5M2": "u1",
}


@dataclass(frozen=True)
class SafetensorsTensor:
    """Where one tensor lies: its file and absolute byte range [start, end)."""

    name: str
    dtype: str  # safetensors' name: "F32", "BF16", "U32", ...
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SafetensorsFile:
    """One .safetensors file's header; `tensor_data` maps tensor bytes on demand."""

    path: Path
    tensors: dict[str, SafetensorsTensor]
    metadata: dict[str, str]
    _data: np.memmap | None = field(default=None, repr=False)

    def tensor_data(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array, memory-mapped."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._data[t.start : t.end]

    def tensor_array(self, name: str) -> np.ndarray:
        """The tensor in its shape (BF16 and 8-bit floats as raw bits), memory-mapped."""
        raw = self.tensor_data(name)
        t = self.tensors[name]
        return raw.view(DTYPES[t.dtype]).reshape(t.shape)


def read_safetensors_header(path: str | Path) -> SafetensorsFile:
    """Parse one file's header, checking every tensor's byte range against its dtype and shape."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: not a complete safetensors file (the header runs past the end)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a safetensors file (the header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, SafetensorsTensor] = {}
    for name, info in header.items():
        try:
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            begin, end = (8 + n + int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry ({exc!r})") from exc
        if end > size:
            raise CheckpointError(f"{path}: not a complete safetensors file ({name} ends past the end)")
        if dtype in DTYPES:
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            if end - begin != expected:
                raise CheckpointError(
                    f"{path}: tensor {name} takes {end - begin} bytes, but {dtype} {list(shape)} needs {expected}"
                )
        tensors[name] = SafetensorsTensor(name, dtype, shape, path, begin, end)
    return SafetensorsFile(path, tensors, metadata)


@dataclass
class SafetensorsCheckpoint:
    """A directory of safetensors files: which file holds which tensor, headers read on demand."""

    directory: Path
    weight_map: dict[str, str]  # tensor name -> file name within the directory
    _files: dict[str, SafetensorsFile] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | Path) -> SafetensorsCheckpoint:
        """From `model.safetensors.index.json` when present, else from every `*.safetensors` file."""
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.is_file():
            return cls(directory, read_index(index))
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        checkpoint = cls(directory, {})
        for file in files:
            checkpoint.weight_map.update(dict.fromkeys(checkpoint.file(file).tensors, file))
        return checkpoint

    def files_for(self, modules: Iterable[str]) -> list[str]:
        """The files holding any tensor of these modules (names without `.weight`/`.bias`/...)."""
        wanted = set(modules)
        return sorted({file for name, file in self.weight_map.items() if module_of(name) in wanted})

    def file(self, file: str) -> SafetensorsFile:
        """One file's header (read once)."""
        if file not in self._files:
            path = self.directory / file
            if not path.is_file():
                raise CheckpointError(f"{path}: no such file (listed in {INDEX_FILE})")
            self._files[file] = read_safetensors_header(path)
        return self._files[file]

    def tensor(self, name: str) -> SafetensorsTensor:
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(f"{self.directory}: tensor {name} is missing")
        found = self.file(file).tensors.get(name)
        if found is None:
            raise CheckpointError(f"{self.directory / file}: tensor {name} is missing (the index lists it)")
        return found

    def tensor_data(self, name: str) -> np.ndarray:
        self.tensor(name)
        return self.file(self.weight_map[name]).tensor_data(name)

    def tensor_array(self, name: str) -> np.ndarray:
        self.tensor(name)
        return self.file(self.weight_map[name]).tensor_array(name)


def read_index(index: Path) -> dict[str, str]:
    """The `weight_map` of a `model.safetensors.index.json`."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index ({exc!r})") from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map is not a JSON object")
    return {str(k): str(v) for k, v in weight_map.items()}
