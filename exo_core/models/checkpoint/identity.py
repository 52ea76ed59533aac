"""What makes two loads read the same weights, for engines that share layers between shards."""

from __future__ import annotations

from pathlib import Path


def file_identity(path: Path) -> tuple | None:
    """The checkpoint file (or directory of safetensors files), each file's size and
    modification time: equal for two loads of the same bytes. None when a file cannot be read."""
    try:
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        return (str(path.resolve()), *((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    except OSError:
        return None
