"""KunlunAccelerator's runtime path, end to end, on an NVIDIA GPU.

On Kunlun, XPyTorch presents the chips through PyTorch's CUDA API (device "cuda", backend "nccl"), so the
accelerator's runtime path is PyTorch's CUDA path. Here detection is forced by putting the throw-away
`torch_xmlir` package on `sys.path`; everything else is real: Lightning's connector, our accelerator,
Lightning's precision plugins, DDP / ModelParallelStrategy process groups over NCCL. This says nothing about
real Kunlun hardware.

Run: `pytest -m gpu tests/test_accelerator_gpu.py -s` (prints the memory stats it logs).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_loneforge.accelerators import KunlunAccelerator, device_profile, register_kunlun

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

STUB_DIR = Path(__file__).parent / "fixtures" / "torch_xmlir_stub"
VOCAB, WIDTH, SEQ = 512, 256, 128


@pytest.fixture
def kunlun_forced(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make `torch_xmlir` findable so `accelerator="kunlun"` is available on this CUDA machine.

    The environment is restored afterwards (BKCL defaults, and the MASTER_*/RANK variables DDP sets).
    """
    saved = dict(os.environ)
    monkeypatch.syspath_prepend(str(STUB_DIR))
    os.environ.pop("DISABLE_XPYTORCH", None)
    os.environ.pop("BKCL_FORCE_L3_RDMA", None)
    register_kunlun()
    yield
    os.environ.clear()
    os.environ.update(saved)


class TinyLM(LightningModule):
    """Embedding, one MLP block, a head; remembers where and in which dtype its last step ran."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, VOCAB)
        self.losses: list[float] = []
        self.seen: dict[str, Any] = {}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens = batch[0]
        logits = self.head(self.block(self.embed(tokens[:, :-1])))
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        self.seen = {
            "device": tokens.device,
            "autocast": torch.is_autocast_enabled("cuda"),
            "logits_dtype": logits.dtype,
            "param_dtype": self.head.weight.dtype,
        }
        self.losses.append(loss.item())
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class ShardedTinyLM(TinyLM):
    """TinyLM with each part FSDP2-sharded on the strategy's data-parallel mesh, as our strategy does per tower."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for part in (self.embed, self.block, self.head):
            fully_shard(part, mesh=mesh)


class MemoryStatsLogger(Callback):
    """Logs the device profile's memory stats after every step and keeps them for the test."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        stats = device_profile(trainer.accelerator).memory_stats(pl_module.device)
        raw = trainer.accelerator.get_device_stats(pl_module.device)
        self.rows.append({**stats, "allocated_bytes.all.peak": float(raw["allocated_bytes.all.peak"])})
        pl_module.log_dict({f"memory/{key}": value for key, value in stats.items()})


class BackendProbe(Callback):
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.backend = torch.distributed.get_backend()
        self.device = pl_module.device


def _same_rows(steps: int, batch_size: int = 4) -> DataLoader:
    """The same batch every step, so a working optimizer must lower the loss."""
    row = torch.randint(0, VOCAB, (batch_size, SEQ), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(row.repeat(steps, 1)), batch_size=batch_size)


def _trainer(tmp_path: Path, steps: int, **kwargs: Any) -> Trainer:
    return Trainer(
        accelerator="kunlun",
        devices=1,
        max_steps=steps,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_kunlun_trains_a_few_steps_on_one_device(kunlun_forced: None, precision: str, tmp_path: Path) -> None:
    steps, model, memory = 6, TinyLM(), MemoryStatsLogger()
    trainer = _trainer(tmp_path, steps, precision=precision, callbacks=[memory])
    assert isinstance(trainer.accelerator, KunlunAccelerator)

    trainer.fit(model, _same_rows(steps))

    assert trainer.strategy.root_device.type == "cuda"  # not Lightning's CPU fallback for unknown names
    assert model.seen["device"].type == "cuda"
    if precision == "bf16-mixed":
        assert model.seen["autocast"] and model.seen["logits_dtype"] == torch.bfloat16
        assert model.seen["param_dtype"] == torch.float32
    else:
        assert model.seen["param_dtype"] == torch.bfloat16
    assert all(math.isfinite(loss) for loss in model.losses) and model.losses[-1] < model.losses[0]
    assert len(memory.rows) == steps and all(row["peak_allocated_gib"] > 0 for row in memory.rows)
    assert os.environ["BKCL_FORCE_L3_RDMA"] == "0"
    print(f"\n[kunlun-on-cuda {precision}] {torch.cuda.get_device_name()} losses {model.losses}")
    for step, row in enumerate(memory.rows):
        print(f"  step {step}: " + ", ".join(f"{key}={value:.4g}" for key, value in row.items()))


def test_kunlun_trains_the_zoo_tiny_demo(kunlun_forced: None, tmp_path: Path) -> None:
    """The zoo's `tiny-demo` on the demo data, with the suite's telemetry: the run the README describes."""
    from lightning_loneforge.datamodules.demo_data import DemoDataModule
    from lightning_loneforge.model_zoo import MultimodalModule
    from lightning_loneforge.telemetry import DeviceMemoryMonitor, PackedThroughputMonitor, RunSummary

    steps = 8
    datamodule = DemoDataModule(
        data_dir=str(tmp_path / "demo"), n_train=128, n_val=8, max_tokens=1024, num_workers=0
    )
    model = MultimodalModule("tiny-demo", max_steps=steps, warmup_steps=1)
    memory, summary = DeviceMemoryMonitor(), RunSummary()
    trainer = _trainer(
        tmp_path,
        steps,
        precision="bf16-mixed",
        limit_val_batches=0,
        callbacks=[PackedThroughputMonitor(window_size=4), memory, summary],
    )
    trainer.fit(model, datamodule=datamodule)

    assert isinstance(trainer.accelerator, KunlunAccelerator)
    assert trainer.strategy.root_device.type == "cuda"
    assert summary.summary["steps"] == steps and summary.summary["tokens_seen"] > 0
    assert memory.run_peak["peak_allocated_gib"] > 0
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    print(f"\n[kunlun-on-cuda tiny-demo] {torch.cuda.get_device_name()}: {summary.summary}")


def test_kunlun_ddp_uses_nccl_on_the_chip(kunlun_forced: None, tmp_path: Path) -> None:
    probe, model = BackendProbe(), TinyLM()
    trainer = _trainer(tmp_path, 2, strategy="ddp", precision="bf16-mixed", callbacks=[probe])
    try:
        trainer.fit(model, _same_rows(2))
    finally:
        _destroy_process_group()
    assert probe.backend == "nccl"
    assert probe.device.type == "cuda"


def test_kunlun_model_parallel_fsdp2_steps(kunlun_forced: None, tmp_path: Path) -> None:
    probe, model = BackendProbe(), ShardedTinyLM()
    trainer = _trainer(
        tmp_path, 3, strategy=ModelParallelStrategy(), precision="bf16-mixed", callbacks=[probe]
    )
    try:
        trainer.fit(model, _same_rows(3))
    finally:
        _destroy_process_group()
    assert probe.backend == "nccl" and probe.device.type == "cuda"
    assert model.losses[-1] < model.losses[0]


def test_kunlun_from_lightning_cli_yaml(
    kunlun_forced: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    config = tmp_path / "kunlun.yaml"
    config.write_text(
        "trainer:\n  accelerator: kunlun\n  devices: 1\n  max_steps: 2\n  logger: false\n"
        "  enable_checkpointing: false\n  enable_progress_bar: false\n"
        f"  default_root_dir: {tmp_path}\n"
    )
    monkeypatch.setattr(sys, "argv", ["loneforge"])
    cli = LightningCLI(BoringModel, BoringDataModule, args=["fit", f"--config={config}"])
    assert isinstance(cli.trainer.accelerator, KunlunAccelerator)
    assert cli.trainer.global_step == 2
    assert cli.trainer.strategy.root_device.type == "cuda"  # Lightning moves the module back to CPU after fit
