"""`device_profile`: every device fact the suite needs, answered in one place.

Telemetry, the strategy and the model zoo ask `device_profile(trainer.accelerator)` (or a device) instead of
calling `torch.cuda` or testing for vendor plugins themselves, so CUDA, Kunlun and CPU share one code base.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator, CUDAAccelerator, MPSAccelerator

from lightning_loneforge.accelerators.kunlun import KunlunAccelerator

PEAK_TFLOPS_ENV = "LONEFORGE_PEAK_TFLOPS"
"""Set to the dense bf16 TFLOP/s of one device to override (or supply) the table below."""

_GIB = 2**30

# Dense (no sparsity) bf16 tensor TFLOP/s per device, from NVIDIA's data sheets (H100/H200: nvidia.com/en-us/
# data-center/h100 and /h200; A100: /a100). Matched in order against `torch.cuda.get_device_name()`.
# H100 variants not listed (NVL, ...) get None rather than a guess.
_PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0),
    (("H100", "HBM3"), 989.0),
    (("H100", "SXM"), 989.0),
    (("H200",), 989.0),
    (("A100",), 312.0),
)

# Kunlun P800: Baidu publishes no dense bf16 peak in the sources we could check (KUNLUN.md lists none), so it
# is unknown (None); set LONEFORGE_PEAK_TFLOPS on Kunlun machines to get MFU.
KUNLUN_P800_PEAK_BF16_TFLOPS: float | None = None

MemoryStats = Callable[[torch.device], dict[str, float]]


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """What the suite needs to know about the device it trains on."""

    accelerator: str
    """Lightning name of the accelerator: "cuda", "kunlun", "cpu", "mps"."""
    device_type: str
    """`torch.device` type tensors live on ("cuda" on Kunlun too)."""
    autocast_device_type: str
    """`device_type` argument of `torch.autocast`."""
    collective_backend: str
    """`torch.distributed` backend ("nccl" on Kunlun: the plugin maps it to BKCL)."""
    device_name: str | None
    """Name the driver reports (`torch.cuda.get_device_name`; "GPU" on Kunlun), None when none is visible."""
    peak_bf16_tflops: float | None
    """Dense bf16 peak of one device in TFLOP/s, None when unknown (then MFU is not reported)."""
    memory_stats: MemoryStats
    """`fn(device) -> {"allocated_gib", "reserved_gib", "peak_allocated_gib", "peak_reserved_gib", "total_gib"}`;
    {} when the device's memory is not tracked (CPU)."""
    reset_peak_memory: Callable[[torch.device], None]
    """Start a new peak-memory window on the device."""
    synchronize: Callable[[], None]
    """Wait for queued device work (for honest timings)."""
    attention_backend: str | None
    """Backend of `model_zoo.attention` to use, or None to let it pick the fastest available."""
    use_compile: bool
    """Whether `torch.compile` should be applied (False on Kunlun, where it is a silent no-op)."""


def device_profile(
    accelerator_or_device: Accelerator | type[Accelerator] | torch.device | str,
) -> DeviceProfile:
    """The `DeviceProfile` of an accelerator (instance or class), a `torch.device` or a name.

    Names: "cuda"/"gpu", "kunlun", "cpu", "mps", or a device string like "cuda:1".

    Raises:
        ValueError: for an accelerator or device type this suite does not know.
    """
    kind, index = _kind_and_index(accelerator_or_device)
    if kind == "cpu":
        return _cpu_profile()
    if kind == "mps":
        return _mps_profile()
    if kind == "kunlun":
        return _cuda_profile(
            "kunlun", index, peak=KUNLUN_P800_PEAK_BF16_TFLOPS, attention_backend="sdpa", use_compile=False
        )
    return _cuda_profile("cuda", index, peak=None, attention_backend=None, use_compile=True)


def peak_bf16_tflops_for(device_name: str | None) -> float | None:
    """Dense bf16 TFLOP/s of an NVIDIA device from its reported name, None when not in the table."""
    if not device_name:
        return None
    upper = device_name.upper()
    for parts, tflops in _PEAK_BF16_TFLOPS:
        if all(part in upper for part in parts):
            return tflops
    return None


def _kind_and_index(target: Accelerator | type[Accelerator] | torch.device | str) -> tuple[str, int | None]:
    if isinstance(target, Accelerator) or (isinstance(target, type) and issubclass(target, Accelerator)):
        cls = target if isinstance(target, type) else type(target)
        for known, kind in (
            (KunlunAccelerator, "kunlun"),
            (CUDAAccelerator, "cuda"),
            (MPSAccelerator, "mps"),
            (CPUAccelerator, "cpu"),
        ):
            if issubclass(cls, known):
                return kind, None
        raise ValueError(f"device_profile: unknown accelerator {cls.__qualname__}")
    if isinstance(target, str) and target in ("kunlun", "gpu"):
        return ("cuda" if target == "gpu" else target), None
    device = torch.device(target)
    if device.type not in ("cuda", "cpu", "mps"):
        raise ValueError(f"device_profile: unknown device type {device.type!r} (from {target!r})")
    return device.type, device.index


def _cuda_profile(
    accelerator: str,
    index: int | None,
    *,
    peak: float | None,
    attention_backend: str | None,
    use_compile: bool,
) -> DeviceProfile:
    device_name = _cuda_device_name(index)
    if accelerator == "cuda":
        peak = peak_bf16_tflops_for(device_name)
    return DeviceProfile(
        accelerator=accelerator,
        device_type="cuda",
        autocast_device_type="cuda",
        collective_backend="nccl",
        device_name=device_name,
        peak_bf16_tflops=_peak_override(peak),
        memory_stats=_cuda_memory_stats,
        reset_peak_memory=torch.cuda.reset_peak_memory_stats,
        synchronize=torch.cuda.synchronize,
        attention_backend=attention_backend,
        use_compile=use_compile,
    )


def _cpu_profile() -> DeviceProfile:
    return DeviceProfile(
        accelerator="cpu",
        device_type="cpu",
        autocast_device_type="cpu",
        collective_backend="gloo",
        device_name=None,
        peak_bf16_tflops=_peak_override(None),
        memory_stats=_untracked_memory,
        reset_peak_memory=_nothing_to_reset,
        synchronize=_nothing_to_wait_for,
        attention_backend="sdpa",
        use_compile=False,
    )


def _mps_profile() -> DeviceProfile:
    return DeviceProfile(
        accelerator="mps",
        device_type="mps",
        autocast_device_type="mps",
        collective_backend="gloo",
        device_name=None,
        peak_bf16_tflops=_peak_override(None),
        memory_stats=_untracked_memory,
        reset_peak_memory=_nothing_to_reset,
        synchronize=torch.mps.synchronize,
        attention_backend="sdpa",
        use_compile=False,
    )


def _peak_override(peak: float | None) -> float | None:
    value = os.environ.get(PEAK_TFLOPS_ENV)
    if not value:
        return peak
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{PEAK_TFLOPS_ENV}={value!r} is not a number of TFLOP/s") from None


def _cuda_device_name(index: int | None) -> str | None:
    if torch.cuda.device_count() == 0:
        return None
    return torch.cuda.get_device_name(index)


def _cuda_memory_stats(device: torch.device) -> dict[str, float]:
    return {
        "allocated_gib": torch.cuda.memory_allocated(device) / _GIB,
        "reserved_gib": torch.cuda.memory_reserved(device) / _GIB,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / _GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / _GIB,
        "total_gib": torch.cuda.get_device_properties(device).total_memory / _GIB,
    }


def _untracked_memory(device: torch.device) -> dict[str, float]:
    return {}


def _nothing_to_reset(device: torch.device) -> None:
    return None


def _nothing_to_wait_for() -> None:
    return None
