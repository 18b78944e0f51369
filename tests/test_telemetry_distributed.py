"""Telemetry on 2 gloo processes: the run summary and the per-rank cost chart add up every rank's own rows."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from lightning_loneforge.datamodules.balancer import CostModel
from lightning_loneforge.telemetry import DataPictures, RunSummary, telemetry_callbacks
from tests._helpers import free_port, join_or_kill
from tests.test_telemetry_run import SKIPPED, STEPS, PackedRows, PackedToy, packed_row

pytestmark = pytest.mark.distributed

WORLD = 2
JOIN_TIMEOUT_S = 120


def rank_rows(rank: int) -> list:
    return [packed_row(100 * rank + i) for i in range(STEPS)]


class RankRows(PackedRows):
    """Different rows on each rank, so a sum over ranks differs from rank 0 times the world size."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def train_dataloader(self) -> DataLoader:
        return DataLoader(rank_rows(self.rank), batch_size=None)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    os.environ["NODE_RANK"] = "0"
    torch.set_num_threads(1)
    result: dict = {}
    try:
        callbacks = telemetry_callbacks(window_size=2, picture_steps=3)
        trainer = Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy=DDPStrategy(timeout=timedelta(seconds=60)),
            max_steps=STEPS,
            use_distributed_sampler=False,
            callbacks=callbacks,
            logger=False,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out_dir,
        )
        trainer.fit(PackedToy(), datamodule=RankRows(rank))
        result["summary"] = next(cb for cb in callbacks if isinstance(cb, RunSummary)).summary
        result["rank_costs"] = next(cb for cb in callbacks if isinstance(cb, DataPictures)).rank_costs
    except BaseException:
        result["error"] = traceback.format_exc()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.timeout(JOIN_TIMEOUT_S + 60)
def test_summary_and_rank_costs_add_up_over_ranks(tmp_path: Path) -> None:
    context = mp.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=_worker, args=(rank, port, str(tmp_path))) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    hung = join_or_kill(procs, JOIN_TIMEOUT_S)
    assert not hung, f"ranks (pids {hung}) still running after {JOIN_TIMEOUT_S}s: a telemetry collective hung"

    results = []
    for rank in range(WORLD):
        path = tmp_path / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no result"
        result = torch.load(path, weights_only=False)
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
        results.append(result)

    tokens = sum(row.num_real_tokens for rank in range(WORLD) for row in rank_rows(rank))
    samples = sum(row.num_samples for rank in range(WORLD) for row in rank_rows(rank))
    cost = CostModel()
    first_costs = [
        sum(cost.pack_cost(row.sample_lengths().tolist()[: row.num_samples]) for row in rank_rows(r)[:3])
        for r in range(WORLD)
    ]
    for result in results:
        summary = result["summary"]
        assert summary["tokens_seen"] == tokens
        assert summary["samples_seen"] == samples
        assert summary["skipped_samples"] == WORLD * sum(SKIPPED.values())
        assert result["rank_costs"] == pytest.approx(first_costs)
    assert first_costs[0] != first_costs[1]
