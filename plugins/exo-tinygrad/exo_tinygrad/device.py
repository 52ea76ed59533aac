"""Which tinygrad device the engine runs on, and how many CPU threads it uses.

The order: `--device`, then `DEV` in the environment, then the first GPU tinygrad can open
(METAL, CUDA, AMD, OpenCL, in that order), then CPU. Before asking tinygrad to open a GPU
backend (a few hundred milliseconds for each it tries), a cheap check looks for its driver
(a device node or a library), so a machine without GPUs starts on CPU without probing.
The choice is written to `DEV` before tinygrad is imported, so tinygrad never probes itself.
Importing this module does not import tinygrad.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
from collections.abc import Callable, Mapping
from pathlib import Path

# (tinygrad device, cheap presence check), in the order of preference
GPUS: tuple[tuple[str, Callable[[], bool]], ...] = (
    ("METAL", lambda: platform.system() == "Darwin" and platform.machine() == "arm64"),
    ("CUDA", lambda: Path("/dev/nvidia0").exists() and ctypes.util.find_library("cuda") is not None),
    ("AMD", lambda: Path("/dev/kfd").exists()),
    ("CL", lambda: ctypes.util.find_library("OpenCL") is not None),
)


def tinygrad_opens(device: str) -> bool:
    """Whether tinygrad can open `device` here (imports tinygrad)."""
    from tinygrad import Device

    try:
        Device[device]
    except Exception:
        return False
    return True


def choose_device(
    requested: str | None,
    environ: Mapping[str, str],
    gpus: tuple[tuple[str, Callable[[], bool]], ...] = GPUS,
    opens: Callable[[str], bool] = tinygrad_opens,
) -> str:
    """The device to run on (see the module docstring); `gpus` and `opens` are for tests."""
    if requested:
        return requested.upper()
    explicit = environ.get("DEV") or environ.get("DEVICE")
    if explicit:
        return explicit.upper()
    for name, present in gpus:
        if present() and opens(name):
            return name
    return "CPU"


def is_cpu(device: str) -> bool:
    return device.split(":")[0].upper() in ("CPU", "CLANG", "LLVM")


def physical_cores() -> int:
    """Physical CPU cores (not SMT threads) this process may use."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        usable = os.cpu_count() or 1
    cores = _physical_cores_linux()
    return max(1, min(usable, cores) if cores else usable)


def _physical_cores_linux() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    pairs = set()
    physical = core = None
    for line in [*text.splitlines(), ""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip():
            if core is not None:
                pairs.add((physical, core))
            physical = core = None
    return len(pairs) or None
