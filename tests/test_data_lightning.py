"""WebDatasetDataModule under a real Lightning Trainer: encoder from the module, mid-epoch checkpoint resume
by key sets (Lightning fetches one batch ahead), metrics logged by PackingMetricsCallback."""

from __future__ import annotations

import os
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch

from lightning_loneforge.datamodules.metrics import PackingMetricsCallback
from lightning_loneforge.datamodules.webdataset_dm import WebDatasetDataModule
from tests.test_data_fixtures import all_keys, encoder, write_shards
from tests.test_data_packed_loss import TinyVLM, per_sample_losses

os.environ.setdefault("WANDB_MODE", "offline")


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        enc = encoder()
        self.model = TinyVLM(enc.tokenizer.vocab_size, enc.image_token_id, 3 * 2 * 14 * 14, dim=16)
        self.seen: list[str] = []

    def sample_encoder(self):
        return encoder()

    def training_step(self, batch, batch_idx):
        self.seen += batch.sample_keys
        losses = per_sample_losses(self.model, batch)
        return torch.stack(losses).sum() / batch.num_real_tokens

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SaveAndStop(pl.Callback):
    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def _trainer(tmp_path, *callbacks) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )


def _dm(urls, num_workers):
    return WebDatasetDataModule(
        urls, max_tokens=256, num_workers=num_workers, lookahead=8, shuffle_buffer=10, balance=True
    )


@pytest.mark.parametrize("num_workers", [2])
def test_lightning_mid_epoch_resume_sees_each_key_once(tmp_path, num_workers):
    urls = write_shards(tmp_path / "shards", n_shards=3, per_shard=16)
    full = TinyModule()
    metrics = PackingMetricsCallback()
    trainer = _trainer(tmp_path, metrics)
    trainer.fit(full, datamodule=_dm(urls, num_workers))
    assert Counter(full.seen) == Counter(all_keys(3, 16))
    logged = trainer.callback_metrics
    assert 0.5 < float(logged["data/real_token_fraction"]) <= 1.0
    assert float(logged["data/balance_ratio"]) == pytest.approx(1.0)
    assert float(logged["data/samples_per_pack"]) >= 1 and "data/wait_s" in logged

    ckpt = str(tmp_path / "mid.ckpt")
    first = TinyModule()
    _trainer(tmp_path, SaveAndStop(4, ckpt)).fit(first, datamodule=_dm(urls, num_workers))
    assert 0 < len(first.seen) < len(full.seen)
    second = TinyModule()
    _trainer(tmp_path).fit(second, datamodule=_dm(urls, num_workers), ckpt_path=ckpt)
    assert Counter(first.seen + second.seen) == Counter(full.seen)
