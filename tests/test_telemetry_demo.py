"""A short CPU demo run (zoo `tiny-demo` + the demo datamodule) logs every telemetry key."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_loneforge.datamodules.demo_data import DemoDataModule
from lightning_loneforge.model_zoo import MultimodalModule
from lightning_loneforge.telemetry import RunSummary, telemetry_callbacks

STEPS = 3


def test_demo_run_logs_throughput_data_health_and_summary(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LONEFORGE_PEAK_TFLOPS", raising=False)
    datamodule = DemoDataModule(
        data_dir=str(tmp_path / "demo"), n_train=48, n_val=8, max_tokens=512, num_workers=0
    )
    model = MultimodalModule("tiny-demo", max_steps=STEPS, warmup_steps=1)
    callbacks = telemetry_callbacks(window_size=2, picture_steps=2)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=CSVLogger(tmp_path, name="demo"),
        log_every_n_steps=1,
        callbacks=callbacks,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=datamodule)

    with (Path(trainer.logger.log_dir) / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    logged = {key for row in rows for key, value in row.items() if value not in ("", None)}
    expected = {
        "train/loss",
        "train/real_tokens",
        "train/device/real_tokens_per_sec",
        "train/device/samples_per_sec",
        "train/device/tflops_per_sec",
        "train/device/attention_tflops_per_sec",
        "data/real_token_fraction",
        "data/samples_per_pack",
        "data/balance_ratio",
        "data/wait_s",
        "data/sample_length_p90",
        "data/pack_fill_mean",
        "data/rank_cost_max_over_mean",
        "summary/tokens_seen",
        "summary/tokens_per_sec",
        "summary/tflops_per_sec",
        "summary/skipped_samples",
    }
    assert expected <= logged, sorted(expected - logged)
    assert not {key for key in logged if "mfu" in key or key.startswith("memory/")}

    summary = next(cb for cb in callbacks if isinstance(cb, RunSummary)).summary
    per_step = [float(row["data/tokens_per_pack"]) for row in rows if row.get("data/tokens_per_pack")]
    assert summary["tokens_seen"] == sum(per_step) and len(per_step) == STEPS
    assert summary["tflops_per_sec"] > 0 and math.isfinite(summary["tflops_per_sec"])
    assert "tok/s" in trainer.progress_bar_metrics
