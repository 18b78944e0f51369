"""Entry point of one rank of the reliability fault-injection runs (no tests here; see test_reliability_faults.py).

`python tests/test_reliability_faultrun.py '<json options>'` with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set by the test trains the zoo `tiny-demo` on demo shards under `TowerParallelStrategy` (gloo) with
the reliability callbacks, writes one JSON line per step (step, loss, lr) to `<record>/rank<r>.jsonl`, and
injects the fault it is told to:

- `hang_in_save`: the N-th checkpoint's DCP write stops after every shard is written, before its metadata
  (the test kills the processes with SIGKILL there);
- `exit_at_step` / `hang_at_step`: one rank exits (`os._exit(3)`) / sleeps as a step begins;
- `fail_save`: the N-th checkpoint's write raises `OSError(ENOSPC)` on every rank (disk full).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.checkpoint import filesystem as dcp_filesystem

from lightning_loneforge.datamodules.demo_data import DemoDataModule
from lightning_loneforge.model_zoo import MultimodalModule
from lightning_loneforge.reliability import (
    BadStepGuard,
    PreemptionCheckpoint,
    RankHeartbeat,
    ReliableCheckpoint,
)
from lightning_loneforge.strategies import TowerParallelStrategy


class StepRecorder(Callback):
    """One JSON line per optimizer step: global step after it, this rank's loss, the learning rate used."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lr = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        line = {"step": trainer.global_step, "loss": float(loss), "lr": self.lr, "keys": list(batch.sample_keys)}
        with self.path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")


class ExitAtStep(Callback):
    def __init__(self, rank: int, step: int, hang: bool = False) -> None:
        self.rank, self.step, self.hang = rank, step, hang

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if self.hang:
                time.sleep(600)
            os._exit(3)


def inject_save_fault(kind: str, save_index: int, flag: Path) -> None:
    """Makes the `save_index`-th DCP write (1-based) hang after its data, or fail with ENOSPC."""
    calls = {"n": 0}
    write_data, finish = dcp_filesystem._FileSystemWriter.write_data, dcp_filesystem._FileSystemWriter.finish

    def failing_write_data(self, plan, planner):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if kind == "fail_save" and calls["n"] == save_index:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(self.path))
        return write_data(self, plan, planner)

    def hanging_finish(self, metadata, results):  # noqa: ANN001, ANN202
        if kind == "hang_in_save" and calls["n"] == save_index:
            flag.write_text("shards written, metadata not\n")
            time.sleep(600)
        return finish(self, metadata, results)

    dcp_filesystem._FileSystemWriter.write_data = failing_write_data
    dcp_filesystem._FileSystemWriter.finish = hanging_finish


def main(options: dict[str, Any]) -> None:
    rank = int(os.environ["RANK"])
    record = Path(options["record"])
    fault = options.get("fault") or {}
    if fault.get("kind") in ("hang_in_save", "fail_save"):
        inject_save_fault(fault["kind"], fault["save_index"], record / "hung")

    pl.seed_everything(0, verbose=False)
    datamodule = DemoDataModule(
        train_shards=options["train_shards"],
        val_shards=options["val_shards"],
        max_tokens=256,
        num_workers=0,
        shuffle_buffer=16,
        lookahead=8,
    )
    model = MultimodalModule("tiny-demo", max_steps=options["max_steps"], warmup_steps=3, lr=3e-3)
    callbacks: list[Callback] = [
        StepRecorder(record / f"rank{rank}.jsonl"),  # first: it records a step before a preemption stops there
        ReliableCheckpoint(
            dirpath=options["ckpt_dir"],
            every_n_train_steps=options.get("every_n", 2),
            keep_last_k=options.get("keep_last_k", 2),
            async_save=options.get("async_save", False),
        ),
        PreemptionCheckpoint(),
        RankHeartbeat(interval_s=0.5),
        BadStepGuard(policy="raise", check_every_n_steps=2),
    ]
    if fault.get("kind") in ("exit_at_step", "hang_at_step"):
        callbacks.append(ExitAtStep(fault["rank"], fault["step"], hang=fault["kind"] == "hang_at_step"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ["WORLD_SIZE"]),
        strategy=TowerParallelStrategy(plans="auto", timeout=options.get("timeout", 60)),
        max_steps=options["max_steps"],
        limit_val_batches=0,
        gradient_clip_val=1.0,
        use_distributed_sampler=False,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(record),
    )
    torch.set_num_threads(1)
    trainer.fit(model, datamodule=datamodule, ckpt_path=options.get("resume"))
    (record / f"done{rank}").write_text(str(trainer.global_step))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
