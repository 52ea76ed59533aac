"""Captured TinyJit graphs kept on disk, so a new process skips lowering every kernel again.

Capturing a graph (scheduling, lowering each kernel's UOps to C, compiling) takes seconds per
graph, mostly in tinygrad's graph rewriting; tinygrad's own disk cache only saves the C
compiler's part. A captured graph is a list of calls of compiled programs (their binaries
included) on buffers, and tinygrad can pickle it: openpilot ships its models that way.

What a graph refers to is saved by role, not by value:
- the model's weights (and other parameters) by their index in `get_parameters(model)`, and
  the live ones are put back on load, so a file holds no weights;
- buffers the graph writes (its arena of intermediates) by size only: a new, empty one is
  allocated on load;
- anything else (a constant the graph only reads) with its contents.
The graph's inputs (KV caches, staging buffers) are parameters of the graph, not part of it.

Files live under `EXO_HOME/cache/tinygrad/graphs/<key>/` where the key covers the model file
(path, size, modification time), the shard, the context cap, the device, tinygrad's version, this
package's code and the settings that change generated code; one file per graph
(`prefill-256.pkl`, `decode-256x1.pkl`, ...). A file that cannot be read is ignored (and the
graph captured again); files are written to a temporary name and renamed, so concurrent
processes never see half a file. `EXO_TINYGRAD_GRAPH_CACHE=0` turns it off.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from tinygrad import Tensor
from tinygrad.device import Buffer
from tinygrad.engine.jit import CapturedJit
from tinygrad.uop.ops import Ops, UOp, buffers

FORMAT = 1  # bump when the file layout or the meaning of a key changes


def enabled() -> bool:
    return os.environ.get("EXO_TINYGRAD_GRAPH_CACHE", "1") != "0"


# the modules whose code decides what a captured graph holds
GRAPH_CODE = ("attention.py", "graphs.py", "kernels.py", "loader.py", "model.py", "quant.py", "runner.py")


def code_version() -> str:
    """A hash of the code that builds graphs: graphs captured by other code are never loaded."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent / name for name in GRAPH_CODE):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(**parts: Any) -> str:
    """A short stable key of the parts (JSON-able values)."""
    import tinygrad

    parts = {
        **parts,
        "format": FORMAT,
        "tinygrad": getattr(tinygrad, "__version__", "?"),
        "code": code_version(),
        "env": {k: os.environ.get(k) for k in ("THREADS", "NUM_CPU_THREADS", "CC", "BEAM", "NOOPT", "DEBUG")},
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


KEEP_DIRECTORIES = 8  # graph directories kept per EXO_HOME (other models, shards, versions)


def prune(directory: Path, keep: int = KEEP_DIRECTORIES) -> None:
    """Mark `directory` used now and delete all but the `keep` most recently used of its
    siblings (each code or model change makes a new key: old ones would pile up)."""
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    os.utime(directory)
    try:
        siblings = sorted(
            (p for p in directory.parent.iterdir() if p.is_dir()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
    except OSError:
        return
    for old in siblings[keep:]:
        if old != directory:
            shutil.rmtree(old, ignore_errors=True)


class GraphStore:
    """Captured graphs of one loaded shard, by name, in one directory."""

    def __init__(self, directory: Path, parameters: list[Tensor]) -> None:
        self.directory = directory
        self._param_index: dict[UOp, int] = {}
        self._params: list[UOp] = []
        for i, t in enumerate(parameters):
            base = t.uop.base
            if base.op is Ops.BUFFER and base not in self._param_index:
                self._param_index[base] = i
            self._params.append(base)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.pkl"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def save(self, name: str, captured: CapturedJit) -> None:
        written = captured._written_uops
        out = io.BytesIO()
        pickler = _Pickler(out, self._param_index, written)
        pickler.dump(captured)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(out.getbuffer())
            os.replace(tmp, self.path(name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, name: str) -> CapturedJit | None:
        path = self.path(name)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            captured = _Unpickler(io.BytesIO(data), self._params).load()
        except Exception:  # a stale or damaged file: capture again (and overwrite it)
            return None
        return captured if isinstance(captured, CapturedJit) else None


class _Pickler(pickle.Pickler):
    def __init__(self, file, params: dict[UOp, int], written: set[UOp]) -> None:
        super().__init__(file, protocol=5)
        self.params = params
        self.written = written

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not UOp or obj.op is not Ops.BUFFER:
            return None
        if (index := self.params.get(obj)) is not None:
            return ("param", index)
        buffer = buffers.get(obj)
        if not isinstance(buffer, Buffer) or buffer._base is not None:
            return None  # not a plain buffer: let tinygrad pickle it (contents included)
        contents = None
        if obj not in self.written and buffer.is_allocated():
            contents = bytes(buffer.as_memoryview())
        return ("buffer", obj.arg.slot, buffer.device, buffer.size, buffer.dtype, buffer.options, contents)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, params: list[UOp]) -> None:
        super().__init__(file)
        self.params = params
        self.made: dict[int, UOp] = {}

    def persistent_load(self, pid: Any) -> Any:
        if pid[0] == "param":
            return self.params[pid[1]]
        _, slot, device, size, dtype, options, contents = pid
        if (made := self.made.get(slot)) is not None:
            return made
        # a new BUFFER UOp (a fresh number, so it cannot collide with one of this process)
        uop = UOp.new_buffer(device, size, dtype)
        buffer = Buffer(device, size, dtype, options=options, initial_value=contents)
        buffers[uop] = buffer.ref(1)
        self.made[slot] = uop
        return uop
