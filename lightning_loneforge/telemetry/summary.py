"""`RunSummary`: at the end of `fit`, one table of what the run did, also in every logger and W&B's summary."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from lightning_loneforge.accelerators import device_profile
from lightning_loneforge.telemetry.counting import batch_flops, real_tokens_in, samples_in
from lightning_loneforge.telemetry.memory import DeviceMemoryMonitor

_ROWS = (
    ("steps", "steps", "{:,.0f}"),
    ("tokens_seen", "real tokens seen", "{:,.0f}"),
    ("samples_seen", "samples seen", "{:,.0f}"),
    ("wall_time_s", "wall time (s)", "{:,.1f}"),
    ("tokens_per_sec", "mean real tokens/s", "{:,.0f}"),
    ("tflops_per_sec", "mean TFLOP/s, all devices (6N)", "{:,.2f}"),
    ("mfu", "mean MFU (6N, dense bf16 peak)", "{:.1%}"),
    ("peak_allocated_gib", "peak allocated (GiB)", "{:,.2f}"),
    ("peak_reserved_gib", "peak reserved (GiB)", "{:,.2f}"),
    ("skipped_samples", "skipped samples", "{:,.0f}"),
)


class RunSummary(pl.Callback):
    """At the end of training: tokens seen, wall time, mean tokens/s, MFU, peak memory and skipped samples.

    Counts every rank's own batches and sums them over ranks at the end (one `all_gather_object`, so counts stay
    exact whatever dtypes the collective library supports). Printed once as a
    table, logged as `summary/<name>` through every Lightning logger, and written to W&B's run summary.
    Numbers that are not known (MFU on CPU, memory on CPU, skips without a datamodule that counts them) are
    left out, not set to zero. The result stays in `self.summary`.

    Args:
        print_table: Print the table on rank zero.
    """

    def __init__(self, print_table: bool = True) -> None:
        self.print_table = print_table
        self.summary: dict[str, float] = {}
        self._totals = [0.0, 0.0, 0.0, 0.0]  # real tokens, samples, 6N FLOPs, batches
        self._flops_known = True
        self._t0 = 0.0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._totals = [0.0, 0.0, 0.0, 0.0]
        self._flops_known = True
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        flops = batch_flops(pl_module, batch)
        self._flops_known &= flops is not None
        dense = flops.dense if flops is not None else 0.0
        step = (real_tokens_in(batch), samples_in(batch), dense, 1.0)
        self._totals = [total + value for total, value in zip(self._totals, step, strict=True)]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        profile = device_profile(trainer.accelerator)
        profile.synchronize()
        wall = time.perf_counter() - self._t0
        per_rank = _gather(self._totals)
        tokens, samples, dense, batches = (sum(column) for column in zip(*per_rank, strict=True))
        summary = {
            "steps": float(trainer.global_step),
            "tokens_seen": tokens,
            "samples_seen": samples,
            "wall_time_s": wall,
            "tokens_per_sec": tokens / wall if wall > 0 else 0.0,
        }
        if self._flops_known and batches:
            summary["tflops_per_sec"] = dense / wall / 1e12
            if profile.peak_bf16_tflops:
                summary["mfu"] = dense / wall / (profile.peak_bf16_tflops * 1e12 * trainer.world_size)
        summary.update(_peak_memory(trainer, pl_module, profile))
        summary.update(_skipped_samples(trainer))
        self.summary = summary
        if trainer.is_global_zero:
            self._publish(trainer, summary)

    def _publish(self, trainer: pl.Trainer, summary: dict[str, float]) -> None:
        if self.print_table:
            Console().print(summary_table(summary))
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"summary/{key}": value for key, value in summary.items()}, step=trainer.global_step
            )
            if isinstance(logger, WandbLogger):
                try:
                    logger.experiment.summary.update(
                        {f"summary/{key}": value for key, value in summary.items()}
                    )
                except Exception as error:  # W&B trouble must not fail a finished run
                    rank_zero_warn(f"RunSummary: could not write the W&B run summary: {error}")


def summary_table(summary: dict[str, float]) -> Table:
    """The run summary as a two-column rich table; unknown numbers read "n/a"."""
    table = Table(title="loneforge run summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, label, fmt in _ROWS:
        table.add_row(label, fmt.format(summary[key]) if key in summary else "n/a")
    for key in sorted(k for k in summary if k.startswith("skipped_") and k != "skipped_samples"):
        table.add_row(f"  {key.removeprefix('skipped_')}", f"{summary[key]:,.0f}")
    return table


def _peak_memory(trainer: pl.Trainer, pl_module: pl.LightningModule, profile: Any) -> dict[str, float]:
    monitor = next((cb for cb in trainer.callbacks if isinstance(cb, DeviceMemoryMonitor)), None)
    if monitor is not None and monitor.run_peak:
        return {key: monitor.run_peak[key] for key in ("peak_allocated_gib", "peak_reserved_gib")}
    stats = profile.memory_stats(pl_module.device)
    if not stats:
        return {}
    local = torch.tensor([stats["peak_allocated_gib"], stats["peak_reserved_gib"]], device=pl_module.device)
    allocated, reserved = trainer.strategy.reduce(local, reduce_op="max").tolist()
    return {"peak_allocated_gib": allocated, "peak_reserved_gib": reserved}


def _skipped_samples(trainer: pl.Trainer) -> dict[str, float]:
    """`skipped_samples` and `skipped_<reason>`, summed over ranks, from the datamodule's `metrics()`."""
    metrics = getattr(trainer.datamodule, "metrics", None)
    if not callable(metrics):
        return {}
    local = {
        key.removeprefix("data/"): float(v) for key, v in metrics().items() if key.startswith("data/skipped_")
    }
    merged: dict[str, float] = {}
    for part in _gather(local):
        for key, value in part.items():
            merged[key] = merged.get(key, 0.0) + value
    merged["skipped_samples"] = sum(merged.values())
    return merged


def _gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (just `[value]` without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
