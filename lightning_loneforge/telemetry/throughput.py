"""`PackedThroughputMonitor`: Lightning's `ThroughputMonitor` for packed rows, MFU from the device profile."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from typing_extensions import override

from lightning_loneforge.accelerators import device_profile
from lightning_loneforge.telemetry.counting import batch_flops, real_tokens_in, samples_in

_RENAMES = {
    "lengths": "real_tokens",
    "items_per_sec": "real_tokens_per_sec",
    "device/items_per_sec": "device/real_tokens_per_sec",
}
PROGRESS_BAR_KEYS = ("tok/s", "mfu")
"""Names under which real tokens/s (all devices) and MFU appear next to the step counter."""


class PackedThroughputMonitor(ThroughputMonitor):
    """Real tokens/s, samples/s, TFLOP/s and MFU of packed rows, per device and in total.

    Lightning's `ThroughputMonitor` with three changes: samples and real tokens are read from `PackedBatch`
    (padding excluded); FLOPs come from the model (`flops_per_batch(batch)` or `flops_per_token()`, see
    `counting.batch_flops`), with attention reported apart; the peak comes from `device_profile` (dense bf16;
    None on CPU or an unknown device, and then no MFU is logged at all).

    Logged with the stage as prefix (`train/`, `validate/`), rolling over `window_size` steps:
    `time`, `batches`, `samples`, `real_tokens`, `device/{batches,samples,real_tokens}_per_sec`,
    `device/tflops_per_sec` (6N basis), `device/attention_tflops_per_sec`, `device/mfu` (6N basis),
    `device/mfu_with_attention`; with several devices also the totals without `device/`.
    The progress bar gets `tok/s` (all devices) and `mfu`.

    Args:
        window_size: Steps the rates are averaged over (nothing but totals is logged before it fills).
        progress_bar: Show `tok/s` and `mfu` in the progress bar.
    """

    def __init__(self, window_size: int = 20, progress_bar: bool = True) -> None:
        super().__init__(batch_size_fn=samples_in, length_fn=real_tokens_in, window_size=window_size)
        self.window_size = window_size
        self.progress_bar = progress_bar
        self.peak_tflops: float | None = None
        self._dense: dict[RunningStage, deque[float]] = {}
        self._attention: dict[RunningStage, deque[float]] = {}
        self._synchronize = _no_sync

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        profile = device_profile(trainer.accelerator)
        self._synchronize = profile.synchronize
        self.peak_tflops = profile.peak_bf16_tflops
        self.available_flops = None if self.peak_tflops is None else self.peak_tflops * 1e12
        if stage == TrainerFn.FITTING and trainer.enable_validation:
            self._throughputs[RunningStage.VALIDATING] = self._new_throughput(trainer)
        assert trainer.state.stage is not None
        self._throughputs[trainer.state.stage] = self._new_throughput(trainer)

    def _new_throughput(self, trainer: pl.Trainer) -> Throughput:
        return Throughput(available_flops=self.available_flops, world_size=trainer.world_size, **self.kwargs)

    @override
    def _start(self, trainer: pl.Trainer) -> None:
        super()._start(trainer)
        stage = trainer.state.stage
        assert stage is not None
        if trainer.state.fn == TrainerFn.FITTING or stage not in self._dense:
            self._dense[stage] = deque(maxlen=self.window_size)
            self._attention[stage] = deque(maxlen=self.window_size)

    @override
    @torch.inference_mode()
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        assert stage is not None
        self._synchronize()
        elapsed = time.perf_counter() - self._t0s[stage]
        self._lengths[stage] += real_tokens_in(batch)
        self._samples[stage] += samples_in(batch)
        self._batches[stage] += 1
        flops = batch_flops(pl_module, batch) if stage == RunningStage.TRAINING else None
        if flops is not None:
            self._dense[stage].append(flops.dense)
            self._attention[stage].append(flops.attention)
        self._throughputs[stage].update(
            time=elapsed,
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=self._lengths[stage],
            flops=None if flops is None else flops.dense,
        )

    @override
    def _compute(self, trainer: pl.Trainer, iter_num: int | None = None) -> None:
        stage = trainer.state.stage
        assert stage is not None
        metrics = self._metrics(stage, trainer.world_size)
        if self.progress_bar and stage == RunningStage.TRAINING:
            self._show_in_progress_bar(trainer, metrics)
        if not trainer._logger_connector.should_update_logs:
            return
        prefixed = {f"{stage.value}/{key}": value for key, value in metrics.items()}
        trainer._logger_connector.log_metrics(prefixed, step=iter_num)

    def _metrics(self, stage: RunningStage, world_size: int) -> dict[str, float]:
        raw = self._throughputs[stage].compute()
        metrics = {_RENAMES.get(key, key): float(value) for key, value in raw.items()}
        for key in ("flops_per_sec", "device/flops_per_sec"):
            if key in metrics:
                metrics[key.replace("flops_per_sec", "tflops_per_sec")] = metrics.pop(key) / 1e12
        share = self._attention_share(stage)
        if share is not None and "device/tflops_per_sec" in metrics:
            metrics["device/attention_tflops_per_sec"] = metrics["device/tflops_per_sec"] * share
            if "device/mfu" in metrics:
                metrics["device/mfu_with_attention"] = metrics["device/mfu"] * (1.0 + share)
        return metrics

    def _attention_share(self, stage: RunningStage) -> float | None:
        """Attention FLOPs over 6N FLOPs across the same window `Throughput` uses (its first entry excluded)."""
        dense, attention = self._dense.get(stage), self._attention.get(stage)
        if not dense or len(dense) < self.window_size:
            return None
        dense_sum = sum(dense) - dense[0]
        return (sum(attention) - attention[0]) / dense_sum if dense_sum > 0 else None

    def _show_in_progress_bar(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        pl_module = trainer.lightning_module
        shown = {}
        if "device/real_tokens_per_sec" in metrics:
            shown["tok/s"] = metrics.get(
                "real_tokens_per_sec", metrics["device/real_tokens_per_sec"] * trainer.world_size
            )
        if "device/mfu" in metrics:
            shown["mfu"] = metrics["device/mfu"]
        for name, value in shown.items():
            pl_module.log(
                name,
                value,
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
                batch_size=1,
                rank_zero_only=True,
            )


def _no_sync() -> None:
    return None
