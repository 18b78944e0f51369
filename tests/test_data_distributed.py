"""Exact resume on 2 gloo ranks x 2 DataLoader workers: key sets after a resume equal an uninterrupted epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_loneforge.datamodules.webdataset_dm import WebDatasetDataModule
from tests.test_data_fixtures import all_keys, encoder, write_shards

WORLD = 2
STOP_AFTER = 3
TIMEOUT_S = 120


def _datamodule(urls: list[str]) -> WebDatasetDataModule:
    dm = WebDatasetDataModule(
        urls, max_tokens=256, num_workers=2, lookahead=8, shuffle_buffer=10, balance=True, encoder=encoder()
    )
    dm.setup("fit")
    return dm


def _rank_main(rank: int, urls: list[str], workdir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/store",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        out = Path(workdir)
        uninterrupted = [k for batch in _datamodule(urls).train_dataloader() for k in batch.sample_keys]
        dm = _datamodule(urls)
        before = []
        for step, batch in enumerate(dm.train_dataloader()):
            before += batch.sample_keys
            if step + 1 == STOP_AFTER:
                break
        state = dm.state_dict()  # a collective: every rank's part
        if rank == 0:
            torch.save(state, out / "state.pt")
        dist.barrier()
        resumed = _datamodule(urls)
        resumed.load_state_dict(torch.load(out / "state.pt", weights_only=False))
        after = [k for batch in resumed.train_dataloader() for k in batch.sample_keys]
        payload = {
            "uninterrupted": uninterrupted,
            "before": before,
            "after": after,
            "ranks": len(state["train"]["ranks"]),
        }
        (out / f"rank{rank}.json").write_text(json.dumps(payload))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(urls: list[str], workdir: Path) -> list[subprocess.Popen]:
    """Each rank is a fresh interpreter (like torchrun / Lightning's DDP launcher), so DataLoader workers fork
    from a normal main process."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = "import sys, json; from tests.test_data_distributed import _rank_main; _rank_main(int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3])"
    return [
        subprocess.Popen(
            [sys.executable, "-c", code, str(rank), json.dumps(urls), str(workdir)], cwd=root, env=env
        )
        for rank in range(WORLD)
    ]


@pytest.mark.distributed
def test_two_ranks_two_workers_resume_by_key_sets(tmp_path):
    urls = write_shards(tmp_path / "shards", n_shards=8, per_shard=12)
    procs = _launch(urls, tmp_path)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes is not None, f"ranks hung past {TIMEOUT_S}s"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert codes == [0] * WORLD or all((tmp_path / f"rank{r}.json").exists() for r in range(WORLD))
    assert all(r["ranks"] == WORLD for r in results)
    union = Counter(k for r in results for k in r["uninterrupted"])
    assert union == Counter(all_keys(8, 12))
    for r in results:
        assert Counter(r["before"] + r["after"]) == Counter(r["uninterrupted"])
    rank_sets = [set(r["uninterrupted"]) for r in results]
    assert not rank_sets[0] & rank_sets[1]
