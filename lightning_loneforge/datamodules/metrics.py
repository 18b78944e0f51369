"""`PackingMetricsCallback`: logs the data pipeline's per-step numbers through `pl_module.log`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_loneforge.datamodules.balancer import CostModel
from lightning_loneforge.datamodules.batch import PackedBatch
from lightning_loneforge.datamodules.webdataset_dm import batch_metrics


class PackingMetricsCallback(pl.Callback):
    """Per training step: real-token fraction, samples and tokens per pack, estimated pack cost, balance
    ratio across ranks (max / mean pack cost, one small all-gather), data wait time, skipped samples.

    Works with any datamodule; `WebDatasetDataModule` adds wait time and skip counts through `metrics()`.

    Args:
        cost_model: Cost of a sample; defaults to the datamodule's, else `CostModel()`.
        log_every_n_steps: Log every n-th step (the all-gather runs only then).
    """

    def __init__(self, cost_model: CostModel | None = None, log_every_n_steps: int = 1) -> None:
        self.cost_model = cost_model
        self.log_every_n_steps = max(1, log_every_n_steps)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, PackedBatch) or trainer.global_step % self.log_every_n_steps:
            return
        datamodule = trainer.datamodule
        cost_model = self.cost_model or getattr(datamodule, "cost_model", None) or CostModel()
        if hasattr(datamodule, "metrics"):
            values = datamodule.metrics(batch)
        else:
            values = batch_metrics(batch, cost_model)
        cost = torch.tensor(values["data/pack_cost"], dtype=torch.float64, device=pl_module.device)
        costs = pl_module.all_gather(cost).reshape(-1)
        values["data/balance_ratio"] = float(costs.max() / costs.mean().clamp_min(1e-12))
        for name, value in values.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=False)


__all__ = ["PackingMetricsCallback"]
