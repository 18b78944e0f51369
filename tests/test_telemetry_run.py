"""Telemetry on a short CPU run over packed rows: every key logged, MFU absent on CPU, summary = logged totals.

The rows and the tiny model are made here (the `PackedBatch` contract plus a `flops_per_batch` like the
zoo's), so these tests exercise the telemetry callbacks and the data pipeline's real `PackingMetricsCallback`
without depending on a particular zoo row.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from lightning_loneforge.accelerators.profile import PEAK_TFLOPS_ENV
from lightning_loneforge.datamodules.balancer import CostModel
from lightning_loneforge.datamodules.batch import IGNORE_INDEX, PackedBatch
from lightning_loneforge.datamodules.webdataset_dm import batch_metrics
from lightning_loneforge.telemetry import RunSummary, telemetry_callbacks

VOCAB, WIDTH, ROW = 97, 16, 64
STEPS = 6
SKIPPED = {"data/skipped_too_long": 2.0, "data/skipped_bad_image": 1.0}


def packed_row(seed: int) -> PackedBatch:
    """One row of 3-5 samples with some padding at the end."""
    gen = torch.Generator().manual_seed(seed)
    count = int(torch.randint(3, 6, (1,), generator=gen))
    lengths = torch.randint(4, ROW // count, (count,), generator=gen)
    real = int(lengths.sum())
    input_ids = torch.randint(1, VOCAB, (ROW,), generator=gen)
    labels = input_ids.clone()
    labels[real:] = IGNORE_INDEX
    cu = torch.zeros(count + 2, dtype=torch.int32)
    cu[1 : count + 1] = torch.cumsum(lengths, 0)
    cu[-1] = ROW  # the padding tail is its own segment
    positions = torch.cat([torch.arange(int(n)) for n in (cu[1:] - cu[:-1])])
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=positions,
        cu_seqlens=cu,
        max_seqlen=int((cu[1:] - cu[:-1]).max()),
        num_real_tokens=real,
        sample_keys=[f"s{seed}-{i}" for i in range(count)],
    )


class PackedToy(LightningModule):
    """Embedding + head over a packed row; states its FLOPs the way the zoo does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(
            self.head(self.embed(batch.input_ids)), batch.labels, ignore_index=IGNORE_INDEX
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        return loss

    def flops_per_batch(self, batch: PackedBatch) -> dict[str, float]:
        dense = 6.0 * self.head.weight.numel() * batch.num_tokens
        attention = 12.0 * WIDTH * float((batch.sample_lengths() ** 2).sum())
        return {
            "llm": dense,
            "vision": 0.0,
            "projector": 0.0,
            "attention": attention,
            "total": dense + attention,
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PackedRows(LightningDataModule):
    """Rows made in memory; `metrics()` answers like `WebDatasetDataModule.metrics` (skips by reason)."""

    def __init__(self) -> None:
        super().__init__()
        self.cost_model = CostModel()

    def train_dataloader(self) -> DataLoader:
        return DataLoader([packed_row(i) for i in range(STEPS)], batch_size=None)

    def metrics(self, batch: PackedBatch | None = None) -> dict[str, float]:
        out = {"data/wait_s": 0.0, **SKIPPED}
        if batch is not None:
            out.update(batch_metrics(batch, self.cost_model))
        return out


def _fit(tmp_path: Path, logger: Any = None) -> tuple[Trainer, PackedToy]:
    model = PackedToy()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=logger if logger is not None else CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        callbacks=telemetry_callbacks(window_size=2, picture_steps=3),
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=PackedRows())
    return trainer, model


def _read_csv(trainer: Trainer) -> list[dict[str, str]]:
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key) not in (None, "")]


@pytest.fixture(autouse=True)
def _no_peak_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEAK_TFLOPS_ENV, raising=False)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, str]:
    """One CPU run shared by the tests that only read what it logged and printed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(PEAK_TFLOPS_ENV, raising=False)
        console = Console(record=True, width=120)
        patch.setattr("lightning_loneforge.telemetry.summary.Console", lambda: console)
        trainer, _ = _fit(tmp_path_factory.mktemp("cpu_run"))
    return trainer, console.export_text()


def test_cpu_run_logs_every_key_and_no_mfu(cpu_run: tuple[Trainer, str]) -> None:
    trainer, _ = cpu_run
    rows = _read_csv(trainer)
    logged = set(rows[0])
    expected = {
        "train/loss",
        "train/real_tokens",
        "train/samples",
        "train/device/real_tokens_per_sec",
        "train/device/samples_per_sec",
        "train/device/tflops_per_sec",
        "train/device/attention_tflops_per_sec",
        "data/real_token_fraction",
        "data/samples_per_pack",
        "data/balance_ratio",
        "data/wait_s",
        "data/skipped_too_long",
        "data/sample_length_p50",
        "data/sample_length_max",
        "data/pack_fill_mean",
        "data/rank_cost_max_over_mean",
        "summary/tokens_seen",
        "summary/tokens_per_sec",
        "summary/skipped_samples",
    }
    assert expected <= logged, sorted(expected - logged)
    assert not [key for key in logged if "mfu" in key]  # CPU: no peak, so no MFU at all (not zero)
    assert not [key for key in logged if key.startswith("memory/")]  # CPU memory is not tracked
    assert "tok/s" in trainer.progress_bar_metrics and "train/loss" in trainer.progress_bar_metrics
    assert "mfu" not in trainer.progress_bar_metrics


def test_summary_matches_logged_totals(cpu_run: tuple[Trainer, str]) -> None:
    trainer, printed = cpu_run
    summary = next(cb for cb in trainer.callbacks if isinstance(cb, RunSummary)).summary
    rows = _read_csv(trainer)

    tokens_per_step = _column(rows, "data/tokens_per_pack")
    assert len(tokens_per_step) == STEPS
    assert summary["tokens_seen"] == sum(tokens_per_step) == _column(rows, "train/real_tokens")[-1]
    assert summary["samples_seen"] == sum(_column(rows, "data/samples_per_pack"))
    assert summary["steps"] == STEPS
    assert summary["skipped_samples"] == sum(SKIPPED.values())
    assert summary["tokens_per_sec"] == pytest.approx(summary["tokens_seen"] / summary["wall_time_s"])
    assert _column(rows, "summary/tokens_seen") == [summary["tokens_seen"]]
    assert "mfu" not in summary and "peak_allocated_gib" not in summary

    assert "loneforge run summary" in printed
    assert f"{summary['tokens_seen']:,.0f}" in printed
    assert "n/a" in printed  # MFU and memory are unknown on CPU


def test_mfu_follows_the_profile_peak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "0.001")  # 1 GFLOP/s, so a CPU run has a measurable MFU
    trainer, _ = _fit(tmp_path)
    rows = _read_csv(trainer)
    mfu, tflops = _column(rows, "train/device/mfu"), _column(rows, "train/device/tflops_per_sec")
    assert mfu and len(mfu) == len(tflops)
    assert mfu == pytest.approx([t / 0.001 for t in tflops])
    with_attention = _column(rows, "train/device/mfu_with_attention")
    attention = _column(rows, "train/device/attention_tflops_per_sec")
    assert with_attention == pytest.approx([(t + a) / 0.001 for t, a in zip(tflops, attention, strict=True)])
    summary = next(cb for cb in trainer.callbacks if isinstance(cb, RunSummary)).summary
    assert summary["mfu"] == pytest.approx(summary["tflops_per_sec"] / 0.001)
    assert trainer.progress_bar_metrics["mfu"] == pytest.approx(mfu[-1])


def test_wandb_offline_run_gets_summary_and_charts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="loneforge-test", save_dir=str(tmp_path), offline=True)
    try:
        trainer, _ = _fit(tmp_path, logger=logger)
        run_summary = dict(logger.experiment.summary)  # this wandb writes the summary file only when online
        files = Path(logger.experiment.dir)
    finally:
        wandb.finish()
    expected = next(cb for cb in trainer.callbacks if isinstance(cb, RunSummary)).summary
    assert run_summary["summary/tokens_seen"] == expected["tokens_seen"]
    assert run_summary["summary/skipped_samples"] == expected["skipped_samples"]
    charts = sorted(
        path.name.split("_table_")[0] for path in (files / "media" / "table").rglob("*.table.json")
    )
    assert charts == ["pack_fill_histogram", "rank_cost", "sample_length_histogram"]
    assert list((files / "media" / "images").rglob("sample_length_image_*.png"))
    lengths = next((files / "media" / "table").rglob("sample_length_histogram_*.table.json"))
    table = json.loads(lengths.read_text())
    picture = next(cb for cb in trainer.callbacks if type(cb).__name__ == "DataPictures")
    assert [row[0] for row in table["data"]] == picture.lengths
