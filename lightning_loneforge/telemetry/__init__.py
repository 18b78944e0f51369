"""Telemetry: tokens/s, MFU, memory, data health and a run summary, through Lightning's loggers and W&B."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_loneforge.telemetry.counting import BatchFlops, batch_flops, real_tokens_in, samples_in
from lightning_loneforge.telemetry.memory import DeviceMemoryMonitor
from lightning_loneforge.telemetry.pictures import DataPictures, picture_numbers
from lightning_loneforge.telemetry.plots import histogram_image, save_histogram
from lightning_loneforge.telemetry.summary import RunSummary, summary_table
from lightning_loneforge.telemetry.throughput import PackedThroughputMonitor

__all__ = [
    "BatchFlops",
    "DataPictures",
    "DeviceMemoryMonitor",
    "PackedThroughputMonitor",
    "RunSummary",
    "batch_flops",
    "histogram_image",
    "picture_numbers",
    "real_tokens_in",
    "samples_in",
    "save_histogram",
    "summary_table",
    "telemetry_callbacks",
]


def telemetry_callbacks(window_size: int = 20, picture_steps: int = 20) -> list[pl.Callback]:
    """The suite's telemetry, ready for `Trainer(callbacks=...)`: throughput/MFU, memory, data health (the data
    pipeline's `PackingMetricsCallback`), data pictures and the run summary."""
    from lightning_loneforge.datamodules.metrics import PackingMetricsCallback

    return [
        PackedThroughputMonitor(window_size=window_size),
        DeviceMemoryMonitor(),
        PackingMetricsCallback(),
        DataPictures(steps=picture_steps),
        RunSummary(),
    ]
