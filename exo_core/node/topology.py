"""What a node knows of itself and its peers: identity, device capabilities, engine, load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import structlog

log = structlog.get_logger("exo.node")


@dataclass(frozen=True)
class DeviceCapabilities:
    """A device as the partitioner sees it; FLOPS in TFLOPS. `memory` (MiB) is what the node
    offers for models now: free memory plus what its engine holds, or its --memory-limit."""

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
    # Source kinds ("gguf", "safetensors") of hub models (hf.co/...) this node holds layers of
    # without listing them (the card comes with the plan's first step); empty: only `models`.
    hub_formats: tuple[str, ...] = ()
    link_port: int = 0  # the link's own listener (exo_core.networking.link); 0: none

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
            "hub_formats": list(self.hub_formats),
            "link_port": self.link_port,
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
            hub_formats=tuple(str(k) for k in data.get("hub_formats") or ()),
            link_port=int(data.get("link_port", 0)),
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


FREE_MEMORY_ENV = "EXO_FREE_MEMORY"  # a size, or a file holding one: stands in for psutil (tests)
MEMORY_REFRESH_ENV = "EXO_MEMORY_REFRESH_S"  # seconds between looks at free memory (default 5)
MIB = 1024 * 1024
# The reported memory moves only when free memory moved by more than this share of it (or
# REPORT_MIN_MIB): a node's memory goes up and down a little all the time, and every change
# would re-split the layers of the next plan.
REPORT_STEP = 0.10
REPORT_MIN_MIB = 256


def free_memory_bytes() -> int:
    """Memory free for new allocations now: psutil's `available` (free + reclaimable cache).

    EXO_FREE_MEMORY stands in for it: a size ("8GB"), or the path of a file holding one, read
    at each look (so a test can change a running node's free memory).
    """
    raw = os.environ.get(FREE_MEMORY_ENV, "").strip()
    if raw:
        try:
            return parse_memory(raw)
        except ValueError:
            return parse_memory(Path(raw).read_text(encoding="utf-8"))
    import psutil

    return int(psutil.virtual_memory().available)


def offered_memory_mb(held_bytes: int = 0) -> int:
    """The memory this node offers for models, in MiB: `--memory-limit` when set, else the memory
    free now plus `held_bytes` (see `device_capabilities`)."""
    return memory_limit_mb() or (free_memory_bytes() + max(held_bytes, 0)) // MIB


def device_capabilities(held_bytes: int = 0) -> DeviceCapabilities:
    """This machine's capabilities: memory from psutil, model/chip from the OS or device tree.

    `memory` is what the partitioner plans with: the memory free now plus `held_bytes`, what
    this node's engine already holds for the models it serves (usable again for them: a node
    does not count its own loaded weights as taken), or `--memory-limit` (EXO_MEMORY_LIMIT)
    when set, which then replaces what the node reports to its peers.
    """
    memory_mb = offered_memory_mb(held_bytes)
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


def reported_memory(reported_mb: int, now_mb: int) -> int:
    """What to report after a look at free memory: `now_mb` when it moved from `reported_mb` by
    more than `REPORT_STEP` of it (at least `REPORT_MIN_MIB`), else still `reported_mb`."""
    if reported_mb <= 0:
        return now_mb
    if abs(now_mb - reported_mb) > max(REPORT_STEP * reported_mb, REPORT_MIN_MIB):
        return now_mb
    return reported_mb


def _refresh_interval() -> float:
    try:
        return max(0.05, float(os.environ.get(MEMORY_REFRESH_ENV) or 5.0))
    except ValueError:
        log.warning(f"{MEMORY_REFRESH_ENV} is not a number of seconds; looking every 5 s")
        return 5.0


class MemoryReporter:
    """Keeps a node's reported memory current: every `interval` seconds it looks at free memory
    (plus what the engine holds, `held()`) and sets new capabilities when the value moved enough
    (`reported_memory`). Peers see them at their next check of this node (`node_info` over the
    peer link), UDP announcements at the next one.

    Capabilities set by someone else (a peers file that lists this node's own) are left alone
    from then on; so is a node under `--memory-limit` (its figure does not change).
    """

    def __init__(
        self,
        get: Callable[[], DeviceCapabilities],
        set_: Callable[[DeviceCapabilities], None],
        held: Callable[[], int] = lambda: 0,
        interval: float | None = None,
    ) -> None:
        self._get = get
        self._set = set_
        self._held = held
        self.interval = interval if interval is not None else _refresh_interval()
        self._mine: DeviceCapabilities | None = get()
        self._task: asyncio.Task[None] | None = None

    def refresh(self) -> bool:
        """One look; True when the reported memory changed."""
        current = self._get()
        if current is not self._mine or memory_limit_mb():
            self._mine = None  # set elsewhere: not ours to change any more
            return False
        try:
            now_mb = offered_memory_mb(self._held())  # the device's name and FLOPS do not change
        except (OSError, ValueError) as exc:
            log.warning("cannot read free memory", error=str(exc))
            return False
        new_mb = reported_memory(current.memory, now_mb)
        if new_mb == current.memory:
            return False
        log.info("free memory changed", before_mb=current.memory, now_mb=new_mb)
        self._mine = replace(current, memory=new_mb)
        self._set(self._mine)
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="exo-memory")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while self._mine is not None:
            await asyncio.sleep(self.interval)
            try:
                self.refresh()
            except Exception as exc:  # a held() that failed: the next look tries again
                log.warning("memory refresh failed", error=str(exc))


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
