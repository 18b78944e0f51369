"""`DataPictures`: what the packed data looks like, drawn once at the start of training."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_loneforge.datamodules.balancer import CostModel
from lightning_loneforge.datamodules.batch import PackedBatch
from lightning_loneforge.telemetry.plots import histogram_image


class DataPictures(pl.Callback):
    """Sample lengths, pack fill and per-rank cost of the first `steps` training steps, published once.

    W&B gets a histogram of sample lengths (a `wandb.plot` chart, plus an image binned as `loneforge data
    inspect` bins), a histogram of pack fill and a bar chart of the estimated cost each rank received. Every logger gets the numbers behind them:
    `data/sample_length_{p50,p90,max}`, `data/pack_fill_{mean,min}` and `data/rank_cost_max_over_mean`.
    Batches that are not `PackedBatch` are ignored.

    Args:
        steps: Training steps to collect before publishing (fewer if training ends first).
    """

    def __init__(self, steps: int = 20) -> None:
        if steps < 1:
            raise ValueError(f"DataPictures: steps must be >= 1, got {steps}")
        self.steps = steps
        self.lengths: list[int] = []
        self.fills: list[float] = []
        self.cost = 0.0
        self.rank_costs: list[float] = []
        self._published = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lengths, self.fills, self.cost, self.rank_costs = [], [], 0.0, []
        self._published = False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._published or not isinstance(batch, PackedBatch):
            return
        lengths = batch.sample_lengths().tolist()[: batch.num_samples]
        cost_model = getattr(trainer.datamodule, "cost_model", None) or CostModel()
        self.lengths.extend(int(n) for n in lengths)
        self.fills.append(batch.num_real_tokens / max(1, batch.num_tokens))
        self.cost += cost_model.pack_cost(lengths)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._published and len(self.fills) >= self.steps:
            self._publish(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._published and self.fills:
            self._publish(trainer, pl_module)

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather per-rank costs (a collective: every rank calls this at the same step) and log."""
        self._published = True
        local = torch.tensor(
            [self.cost], dtype=torch.float32, device=pl_module.device
        )  # fp32: chips without fp64
        self.rank_costs = pl_module.all_gather(local).reshape(-1).cpu().tolist()
        if not trainer.is_global_zero:
            return
        numbers = picture_numbers(self.lengths, self.fills, self.rank_costs)
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                try:
                    logger.experiment.log(self._wandb_charts())
                except Exception as error:  # pictures are a nicety: warn, never stop training
                    rank_zero_warn(f"DataPictures: could not log W&B charts: {error}")

    def _wandb_charts(self) -> dict[str, Any]:
        import wandb

        lengths = wandb.Table(data=[[n] for n in self.lengths], columns=["tokens"])
        fills = wandb.Table(data=[[f] for f in self.fills], columns=["fill"])
        costs = wandb.Table(
            data=[[str(r), c] for r, c in enumerate(self.rank_costs)], columns=["rank", "cost"]
        )
        first = f"first {len(self.fills)} steps"
        from lightning_loneforge.datamodules.tools import (
            length_histogram,
        )  # the bins `loneforge data inspect` uses

        lengths_image = histogram_image(
            length_histogram(self.lengths), f"Sample length in tokens ({first}, rank 0)"
        )
        return {
            "data/sample_length_image": wandb.Image(lengths_image),
            "data/sample_length_histogram": wandb.plot.histogram(
                lengths, "tokens", title=f"Sample length in tokens ({first}, rank 0)"
            ),
            "data/pack_fill_histogram": wandb.plot.histogram(
                fills, "fill", title=f"Pack fill ({first}, rank 0)"
            ),
            "data/rank_cost": wandb.plot.bar(
                costs, "rank", "cost", title=f"Estimated cost per rank ({first})"
            ),
        }


def picture_numbers(lengths: list[int], fills: list[float], rank_costs: list[float]) -> dict[str, float]:
    """The numbers behind the pictures, for loggers that cannot draw."""
    out: dict[str, float] = {}
    if lengths:
        ordered = torch.tensor(sorted(lengths), dtype=torch.float64)
        out["data/sample_length_p50"] = float(torch.quantile(ordered, 0.5))
        out["data/sample_length_p90"] = float(torch.quantile(ordered, 0.9))
        out["data/sample_length_max"] = float(ordered[-1])
    if fills:
        out["data/pack_fill_mean"] = sum(fills) / len(fills)
        out["data/pack_fill_min"] = min(fills)
    if rank_costs and sum(rank_costs) > 0:
        out["data/rank_cost_max_over_mean"] = max(rank_costs) / (sum(rank_costs) / len(rank_costs))
    return out
