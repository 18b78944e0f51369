"""A dead rank: the survivors stop with an error that names it, instead of hanging.

Two parts:

- The collective timeout is the strategy's `timeout` (`TowerParallelStrategy(timeout=...)`, default 1800 s,
  as in PyTorch). A collective that waits longer fails; one whose peer process exited fails at once on gloo
  (the connection closes), and on NCCL through its watchdog (`TORCH_NCCL_ASYNC_ERROR_HANDLING`, on by default).
- `RankHeartbeat`: every rank's background thread writes `(beat counter, step)` into the rendezvous store every
  `interval_s`. When training fails, each rank reads the beats twice, `3 * interval_s` apart: a rank whose
  counter did not move (or the store host, rank 0, when the store is gone) is dead. The error gets a note such
  as `rank 1 is gone: its heartbeat stopped (last at step 3)` and the same line is logged. When every rank is
  alive (a collective timed out because a rank is stuck), a `monitored_barrier` on a gloo group names on rank 0
  the ranks that never arrive.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

log = logging.getLogger(__name__)

KEY_PREFIX = "loneforge/heartbeat/"


def _store(timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def _read_beats(store: dist.TCPStore, world_size: int) -> dict[int, tuple[int, int] | None]:
    beats: dict[int, tuple[int, int] | None] = {}
    for rank in range(world_size):
        key = f"{KEY_PREFIX}{rank}"
        if not store.check([key]):
            beats[rank] = None
            continue
        counter, step = store.get(key).decode().split()
        beats[rank] = (int(counter), int(step))
    return beats


def missing_ranks(world_size: int, interval_s: float) -> tuple[dict[int, str], dict[int, int]]:
    """Ranks whose heartbeat stopped, with why, and the last step every live rank reported.

    Takes `3 * interval_s`. When the store cannot be reached, rank 0 (its host) is reported.
    """
    try:
        store = _store(timeout_s=max(2.0, 2 * interval_s))
        first = _read_beats(store, world_size)
        time.sleep(3 * interval_s)
        second = _read_beats(store, world_size)
    except Exception as error:  # the store lives in rank 0's process
        return {0: f"the rendezvous store it hosts is unreachable ({type(error).__name__})"}, {}
    gone: dict[int, str] = {}
    steps: dict[int, int] = {}
    for rank in range(world_size):
        before, after = first[rank], second[rank]
        if after is None:
            gone[rank] = "it never sent a heartbeat"
        elif before is not None and after[0] == before[0]:
            gone[rank] = f"its heartbeat stopped (last at step {after[1]})"
        else:
            steps[rank] = after[1]
    return gone, steps


def stuck_ranks_note(group: dist.ProcessGroup, rank: int, timeout_s: float) -> str | None:
    """Runs `monitored_barrier` on a gloo `group`: rank 0 learns which live ranks never arrive (stuck).

    Returns a note naming them, or None when every rank arrived.
    """
    try:
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except Exception as error:
        if rank == 0:
            first_line = str(error).strip().splitlines()[0]
            return f"stuck: {first_line}"
        return f"rank 0 did not answer a monitored barrier within {timeout_s:.0f} s (it, or a rank it waits for, is stuck)"
    return None


class RankHeartbeat(Callback):
    """Names the dead rank(s) in the error when a multi-process run fails.

    Args:
        interval_s: Seconds between beats; identifying a dead rank takes `3 * interval_s` after a failure.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"RankHeartbeat(interval_s={interval_s}): must be > 0.")
        self.interval_s = interval_s
        self.step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._world_size = 1
        self._barrier_group: dist.ProcessGroup | None = None

    def _beat(self, rank: int) -> None:
        store = _store(timeout_s=max(5.0, 5 * self.interval_s))
        counter = 0
        while not self._stop.is_set():
            counter += 1
            try:
                store.set(f"{KEY_PREFIX}{rank}", f"{counter} {self.step}")
            except Exception:
                return
            self._stop.wait(self.interval_s)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._world_size = trainer.world_size
        if self._world_size < 2 or not (dist.is_available() and dist.is_initialized()) or self._thread is not None:
            return
        self._barrier_group = dist.new_group(backend="gloo")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, args=(trainer.global_rank,), name="loneforge-heartbeat", daemon=True
        )
        self._thread.start()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int) -> None:
        self.step = trainer.global_step

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._thread is None or isinstance(exception, (KeyboardInterrupt, SystemExit)):
            return
        gone, steps = missing_ranks(self._world_size, self.interval_s)
        if gone:
            names = ", ".join(f"rank {rank}" for rank in sorted(gone))
            reasons = "; ".join(f"rank {rank} is gone: {why}" for rank, why in sorted(gone.items()))
            note = f"loneforge: {names} of {self._world_size} stopped responding ({reasons}). Live ranks' steps: {steps}."
        else:
            assert self._barrier_group is not None
            stuck = stuck_ranks_note(self._barrier_group, trainer.global_rank, max(5.0, 3 * self.interval_s))
            note = f"loneforge: no rank's process died (last steps per rank: {steps})" + (f"; {stuck}" if stuck else ".")
        log.error(f"[rank {trainer.global_rank}] {note}")
        if hasattr(exception, "add_note"):
            exception.add_note(note)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 1)
        self._thread = None
