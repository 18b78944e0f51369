"""Step time with asynchronous DCP checkpoint saves on vs off (CPU, one process, `TowerParallelStrategy`).

A model with many parameters and little compute (a stack of square linear layers) makes the checkpoint write
the visible cost. Both runs train the same steps and save a sharded checkpoint every `--every` steps through
`ReliableCheckpoint`; reported per run: the median step time of steps without a save, the mean time of the
steps that saved (the training loop's stall), the wall time, and with async on the part of the stall spent
dumping and staging the state into CPU memory.

    python benchmarks/async_save.py --width 2048 --layers 8 --steps 30 --every 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_loneforge.reliability import ReliableCheckpoint
from lightning_loneforge.strategies import TowerParallelStrategy


class WideStack(pl.LightningModule):
    """`layers` square linear layers (the `llm` tower's blocks): parameters dominate, compute is small."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def towers(self) -> dict[str, nn.Module]:
        return {"llm": self}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x.pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._last = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if not self._last:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def run(async_save: bool, args: argparse.Namespace, root: Path) -> dict:
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.randn(args.steps * args.batch, args.width), batch_size=args.batch)
    timer = StepTimer()
    ckpt = ReliableCheckpoint(
        dirpath=root / ("async" if async_save else "sync"),
        every_n_train_steps=args.every,
        keep_last_k=2,
        async_save=async_save,
    )
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        strategy=TowerParallelStrategy(plans={"llm": {"shard": "full"}}),
        max_steps=args.steps,
        logger=False,
        callbacks=[ckpt, timer],  # Lightning runs checkpoint callbacks last: a save lands in the next step's time
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(WideStack(args.width, args.layers), data)
    wall = time.perf_counter() - started
    steps = timer.times[1:]  # the first step includes warm-up; times[i] is step i + 1 plus the save of step i
    saving = [t for step, t in enumerate(steps, start=2) if (step - 1) % args.every == 0]
    plain = [t for step, t in enumerate(steps, start=2) if (step - 1) % args.every]
    size = sum(f.stat().st_size for f in (root / ("async" if async_save else "sync")).rglob("*") if f.is_file()) / 2
    return {
        "async_save": async_save,
        "step_s_median_no_save": statistics.median(plain),
        "step_s_mean_with_save": statistics.mean(saving),
        "stall_s_dump_and_stage": statistics.mean(ckpt.async_stall_s) if ckpt.async_stall_s else None,
        "wall_s": wall,
        "checkpoint_mib": size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        results = [run(False, args, Path(root)), run(True, args, Path(root))]
    for result in results:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
