"""Device and thread selection (exo_tinygrad.device), on any machine: GPUs are simulated."""

from __future__ import annotations

from exo_tinygrad.device import choose_device, is_cpu, physical_cores


def gpus(*present: str):
    """A GPU table where only `present` have their driver installed."""
    return tuple((name, lambda name=name: name in present) for name in ("METAL", "CUDA", "AMD", "CL"))


def opens_all(device: str) -> bool:
    return True


def test_explicit_device_wins():
    assert choose_device("cuda", {"DEV": "AMD"}, gpus("AMD"), opens_all) == "CUDA"


def test_dev_environment_wins_over_gpus():
    assert choose_device(None, {"DEV": "cpu"}, gpus("CUDA"), opens_all) == "CPU"


def test_first_gpu_that_opens_is_chosen():
    assert choose_device(None, {}, gpus("AMD", "CL"), opens_all) == "AMD"
    assert choose_device(None, {}, gpus("AMD", "CL"), lambda d: d == "CL") == "CL"


def test_cpu_without_gpus_and_without_probing():
    probed: list[str] = []

    def opens(device: str) -> bool:
        probed.append(device)
        return True

    assert choose_device(None, {}, gpus(), opens) == "CPU"
    assert probed == []  # no driver present: tinygrad is never asked


def test_gpu_driver_that_fails_to_open_falls_back_to_cpu():
    assert choose_device(None, {}, gpus("CUDA"), lambda d: False) == "CPU"


def test_cpu_names_and_cores():
    assert is_cpu("CPU") and is_cpu("cpu:1") and not is_cpu("CUDA")
    assert physical_cores() >= 1
