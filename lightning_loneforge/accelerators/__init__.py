"""Accelerators: Kunlun XPUs beside Lightning's own, and the one place that answers device questions."""

from __future__ import annotations

import warnings

from lightning.pytorch.accelerators import AcceleratorRegistry

from lightning_loneforge.accelerators.kunlun import (
    KunlunAccelerator,
    KunlunNotAvailableError,
    apply_bkcl_defaults,
    kunlun_plugin_installed,
    kunlun_unavailable_reason,
    process_group_timeout,
)
from lightning_loneforge.accelerators.profile import DeviceProfile, device_profile

__all__ = [
    "DeviceProfile",
    "KunlunAccelerator",
    "KunlunNotAvailableError",
    "apply_bkcl_defaults",
    "device_profile",
    "kunlun_plugin_installed",
    "kunlun_unavailable_reason",
    "process_group_timeout",
    "register_kunlun",
]


def register_kunlun() -> None:
    """Register `KunlunAccelerator` as "kunlun" in Lightning's `AcceleratorRegistry`; repeated calls do nothing.

    Lightning no longer discovers third-party accelerators, so `lightning_loneforge/__init__.py` calls this.
    A "kunlun" entry registered by another package is left in place, with a warning.
    """
    name = KunlunAccelerator.name()
    if name in AcceleratorRegistry:
        registered = dict.__getitem__(AcceleratorRegistry, name)["accelerator"]
        if registered is not KunlunAccelerator:
            warnings.warn(
                f"Lightning's accelerator name {name!r} already belongs to {registered.__qualname__}; "
                f"lightning_loneforge leaves it. Pass accelerator=KunlunAccelerator() to use ours.",
                stacklevel=2,
            )
        return
    KunlunAccelerator.register_accelerators(AcceleratorRegistry)
