"""What a node knows of itself and its peers: identity, device capabilities, engine, load."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DeviceCapabilities:
    """A device as the partitioner sees it; memory in MB, FLOPS in TFLOPS."""

    model: str = "Unknown"
    chip: str = "Unknown"
    memory: int = 0
    flops: dict[str, float] = field(default_factory=lambda: {"fp32": 0.0, "fp16": 0.0, "int8": 0.0})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DeviceCapabilities:
        flops = data.get("flops") or {}
        return cls(
            model=str(data.get("model", "Unknown")),
            chip=str(data.get("chip", "Unknown")),
            memory=int(data.get("memory", 0)),
            flops={k: float(flops.get(k, 0.0)) for k in ("fp32", "fp16", "int8")},
        )


@dataclass(frozen=True)
class NodeInfo:
    """One node of the cluster: how to reach it and what it can do."""

    node_id: str
    address: str = "127.0.0.1"
    port: int = 0
    capabilities: DeviceCapabilities = field(default_factory=DeviceCapabilities)
    engine: str = ""
    supports_sharding: bool = True
    models: tuple[str, ...] = ()  # model ids this node's engine can serve
    active_requests: int = 0
    # Whole-request engines: (model id, how many servers of this node serve it), one queue each.
    servers: tuple[tuple[str, int], ...] = ()

    def servers_for(self, model_id: str) -> int:
        """How many requests for the model this node can run side by side (1 unless it said)."""
        return max(1, dict(self.servers).get(model_id, 1))

    def to_dict(self) -> dict:
        return {
            "node_id": self.node_id,
            "address": self.address,
            "port": self.port,
            "capabilities": self.capabilities.to_dict(),
            "engine": self.engine,
            "supports_sharding": self.supports_sharding,
            "models": list(self.models),
            "active_requests": self.active_requests,
            "servers": dict(self.servers),
        }

    @classmethod
    def from_dict(cls, data: dict) -> NodeInfo:
        return cls(
            node_id=str(data["node_id"]),
            address=str(data.get("address", "")),
            port=int(data.get("port", 0)),
            capabilities=DeviceCapabilities.from_dict(data.get("capabilities") or {}),
            engine=str(data.get("engine", "")),
            supports_sharding=bool(data.get("supports_sharding", True)),
            models=tuple(data.get("models") or ()),
            active_requests=int(data.get("active_requests", 0)),
            servers=tuple((str(k), int(v)) for k, v in (data.get("servers") or {}).items()),
        )


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip("\x00\n ")
    except OSError:
        return ""


def is_rk3588() -> bool:
    """True on a Rockchip RK3588 board (from the device tree)."""
    compatible = _read_text("/proc/device-tree/compatible")
    return "rk3588" in compatible.lower()


MEMORY_LIMIT_ENV = "EXO_MEMORY_LIMIT"
_UNITS = {"": 1000**3, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3}
_UNITS |= {"t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_memory(text: str) -> int:
    """A memory size in bytes: "16GB", "16 GiB", "800MB", "16" (GB); ValueError with the forms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else ""
    if not match or unit not in _UNITS or float(match[1]) <= 0:
        raise ValueError(f"memory size {text!r}: give a number and a unit, like 16GB, 16GiB or 800MB")
    return int(float(match[1]) * _UNITS[unit])


def memory_limit_mb() -> int | None:
    """--memory-limit (EXO_MEMORY_LIMIT) in MiB, the memory this node offers for models."""
    raw = os.environ.get(MEMORY_LIMIT_ENV)
    return parse_memory(raw) // (1024 * 1024) if raw else None


def device_capabilities() -> DeviceCapabilities:
    """This machine's capabilities: memory from psutil, model/chip from the OS or device tree.

    `memory` is what the partitioner plans with: the machine's memory, or `--memory-limit`
    (EXO_MEMORY_LIMIT) when set, which is what the node then reports to its peers.
    """
    import psutil

    memory_mb = memory_limit_mb() or psutil.virtual_memory().total // (1024 * 1024)
    system = platform.system()
    if system == "Darwin":
        chip = platform.processor() or "Apple Silicon"
        return DeviceCapabilities(model="Mac", chip=chip, memory=memory_mb, flops=_estimate_flops())
    if is_rk3588():
        model = _read_text("/proc/device-tree/model") or "RK3588 board"
        return DeviceCapabilities(
            model=model,
            chip="Rockchip RK3588",
            memory=memory_mb,
            flops={"fp32": 0.1, "fp16": 0.2, "int8": 6.0},  # NPU: 6 TOPS int8
        )
    model = _read_text("/proc/device-tree/model") or f"Linux {platform.machine()}"
    return DeviceCapabilities(model=model, chip=_cpu_name(), memory=memory_mb, flops=_estimate_flops())


def _cpu_name() -> str:
    for line in _read_text("/proc/cpuinfo").splitlines():
        if line.lower().startswith(("model name", "hardware")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "Unknown"


def _estimate_flops() -> dict[str, float]:
    # A rough figure: ~16 fp32 FLOP/cycle/core at ~2.5 GHz; only the ratio between nodes matters.
    cores = os.cpu_count() or 1
    fp32 = cores * 16 * 2.5e9 / 1e12
    return {"fp32": round(fp32, 3), "fp16": round(fp32 * 2, 3), "int8": round(fp32 * 4, 3)}
