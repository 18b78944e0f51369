"""`DeviceMemoryMonitor`: peak allocated and reserved device memory of every step, from the device profile."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_loneforge.accelerators import device_profile

_PEAK_KEYS = ("peak_allocated_gib", "peak_reserved_gib")


class DeviceMemoryMonitor(pl.Callback):
    """Logs `memory/peak_allocated_gib`, `memory/peak_reserved_gib` and `memory/peak_reserved_fraction` per step.

    Each step starts a new peak window, and the values are the maximum over ranks (the rank that runs out of
    memory first is the one that matters). Devices whose memory is not tracked (CPU) log nothing.
    `run_peak` keeps the largest values of the run for `RunSummary`.

    Args:
        warn_fraction: Warn once when the reserved peak passes this fraction of the device's memory.
    """

    def __init__(self, warn_fraction: float = 0.95) -> None:
        self.warn_fraction = warn_fraction
        self.run_peak: dict[str, float] = {}
        self._warned = False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        device_profile(trainer.accelerator).reset_peak_memory(pl_module.device)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        stats = device_profile(trainer.accelerator).memory_stats(pl_module.device)
        if not stats:
            return
        local = torch.tensor([stats[key] for key in _PEAK_KEYS], dtype=torch.float32, device=pl_module.device)
        peaks = dict(zip(_PEAK_KEYS, trainer.strategy.reduce(local, reduce_op="max").tolist(), strict=True))
        if stats.get("total_gib"):
            peaks["peak_reserved_fraction"] = peaks["peak_reserved_gib"] / stats["total_gib"]
        for key, value in peaks.items():
            self.run_peak[key] = max(value, self.run_peak.get(key, 0.0))
            pl_module.log(f"memory/{key}", value, on_step=True, on_epoch=False, batch_size=1)
        fraction = peaks.get("peak_reserved_fraction", 0.0)
        if fraction > self.warn_fraction and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"Device memory: step {trainer.global_step} reserved {fraction:.0%} of the device "
                f"({peaks['peak_reserved_gib']:.1f} GiB); the run is close to running out of memory."
            )
