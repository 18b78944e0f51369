"""`PackedStream` (one rank's packed batches from WebDataset shards) and `PackedLoader` (its resumable DataLoader).

Exact resume: the stream of one DataLoader worker is a deterministic function of (shards, seed, epoch, rank,
worker). Each batch comes out of the worker with the worker's state after producing it: how many samples it
has pulled from the shuffled stream, which of them the packer still buffers (by stream index), skip
counters. A resumed worker rebuilds the same stream, drops the pulled samples undecoded (it re-reads their
tar bytes, nothing more) except the buffered ones, which go back into the packer, and continues: the samples
seen over the epoch are exactly those of an uninterrupted run.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_loneforge.datamodules.batch import PackedBatch
from lightning_loneforge.datamodules.encoder import EncodedSample
from lightning_loneforge.datamodules.packer import TokenBudgetPacker
from lightning_loneforge.datamodules.stages import (
    BadInputHandler,
    encode_samples,
    number_samples,
    split_by_rank,
)

WorkerState = dict[str, Any]


class PackedStream(IterableDataset):
    """Packed batches of one data-parallel rank; yields `(PackedBatch | None, worker_state)` pairs.

    `None` marks the end of a worker's stream (its final state). `epoch` and `resume` (worker id -> saved
    worker state) are set by `PackedLoader` before each pass.

    Args:
        urls: Expanded shard urls (local paths or `pipe:` commands), in the same order on every rank.
        encoder: The model's `SampleEncoder` (any callable dict -> `EncodedSample`).
        make_packer: Builds a fresh `TokenBudgetPacker` for each worker pass.
        rank, world_size: Data-parallel position; shards are split by rank, then by DataLoader worker.
        seed: Shard-order and sample-shuffle seed (shared by all ranks).
        shuffle_buffer: Samples in the shuffle buffer (0: no shuffling, e.g. validation).
        bad_sample: "raise" or "skip" (counted) for corrupt shards, undecodable or malformed samples.
    """

    def __init__(
        self,
        urls: Sequence[str],
        encoder: Callable[[dict[str, Any]], EncodedSample],
        make_packer: Callable[[], TokenBudgetPacker],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        bad_sample: str = "raise",
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.encoder = encoder
        self.make_packer = make_packer
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.bad_sample = bad_sample
        self.epoch = 0
        self.resume: dict[int, WorkerState] = {}

    def shard_order(self) -> list[str]:
        """This epoch's shard order (the same on every rank)."""
        urls = list(self.urls)
        if self.shuffle_buffer > 0:
            random.Random(f"shards-{self.seed}-{self.epoch}").shuffle(urls)
        return urls

    def __iter__(self) -> Iterator[tuple[PackedBatch | None, WorkerState]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        yield from self.worker_stream(worker, self.resume.get(worker))

    def worker_stream(
        self, worker: int, saved: WorkerState | None = None
    ) -> Iterator[tuple[PackedBatch | None, WorkerState]]:
        handler = BadInputHandler(self.bad_sample)
        packer = self.make_packer()
        start, keep = 0, frozenset()
        if saved is not None:
            if saved["epoch"] != self.epoch or saved["worker"] != worker:
                raise ValueError(
                    f"resume state of worker {saved['worker']} epoch {saved['epoch']} given to "
                    f"worker {worker} epoch {self.epoch}"
                )
            start = int(saved["consumed"])
            packer.load_state_dict(saved["packer"])
            handler.skipped = Counter(saved["skipped"])
            keep = packer.restoring
            if saved["done"]:
                yield None, saved
                return
        shards = split_by_rank(({"url": url} for url in self.shard_order()), self.rank, self.world_size)
        samples = wds.tarfile_to_samples(handler=handler)(wds.split_by_worker(shards))
        if self.shuffle_buffer > 0:
            rng = random.Random(f"samples-{self.seed}-{self.epoch}-{self.rank}-{worker}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        pulled = [start]
        numbered = number_samples(samples, start, keep, pulled)
        decoded = wds.decode("pil", handler=handler)(numbered)
        encoded = encode_samples(decoded, self.encoder, handler)

        def state(done: bool) -> WorkerState:
            skipped = handler.skipped + packer.skipped
            return {
                "epoch": self.epoch,
                "worker": worker,
                "consumed": pulled[0],
                "packer": packer.state_dict(),
                "skipped": dict(skipped),
                "done": done,
            }

        for batch in packer(encoded):
            yield batch, state(False)
        yield None, state(True)


class PackedLoader(DataLoader):
    """A `DataLoader(batch_size=None)` over a `PackedStream` with `state_dict()`/`load_state_dict()`.

    The state is that after the last batch *consumed*: Lightning fetches one batch ahead, so the datamodule
    calls `mark_consumed(batch)` when a batch really enters a training step; without such calls the last
    yielded batch counts. Under torch.distributed the state holds every rank's part (`state_dict()` is a
    collective: call it on all ranks, as Lightning's checkpointing does).
    """

    def __init__(
        self, dataset: PackedStream, num_workers: int = 0, steps_per_epoch: int | None = None, **kwargs: Any
    ) -> None:
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 or None, got {steps_per_epoch}")
        kwargs.pop("batch_size", None)
        kwargs.pop("persistent_workers", None)
        super().__init__(
            dataset, batch_size=None, num_workers=num_workers, persistent_workers=False, **kwargs
        )
        self.steps_per_epoch = steps_per_epoch
        self._live: Iterator[PackedBatch] | None = None
        self._epoch = 0
        self._workers: dict[int, WorkerState] = {}
        self._history: deque[tuple[PackedBatch, dict[str, Any]]] = deque(maxlen=16)
        self._consumed: dict[str, Any] | None = None
        self.data_wait_s = 0.0
        self.skipped: dict[str, int] = {}
        """Samples/shards dropped under the "skip" policy, by reason, since the start of training."""
        self._skipped_done: Counter[str] = Counter()

    def __len__(self) -> int:
        if self.steps_per_epoch is None:
            return super().__len__()
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[PackedBatch]:
        """One pass over this rank's shards; with `steps_per_epoch`, exactly that many batches, continuing
        the current pass and wrapping into the next one (so every rank runs the same number of steps)."""
        if self.steps_per_epoch is None:
            yield from self._one_pass()
            return
        for _ in range(self.steps_per_epoch):
            for fresh in (False, True):
                if self._live is None:
                    self._live = self._one_pass()
                try:
                    yield next(self._live)
                    break
                except StopIteration:
                    self._live = None
                    if fresh:
                        raise RuntimeError("a whole pass over this rank's shards gave no batch") from None

    def _one_pass(self) -> Iterator[PackedBatch]:
        stream: PackedStream = self.dataset  # type: ignore[assignment]
        stream.epoch = self._epoch
        if self._workers and all(s["done"] for s in self._workers.values()):
            self._skipped_done.update(self._skipped())
            self._epoch, self._workers = self._epoch + 1, {}
            stream.epoch = self._epoch
        stream.resume = dict(self._workers)
        inner = super().__iter__()
        while True:
            start = time.perf_counter()
            try:
                batch, state = next(inner)
            except StopIteration:
                break
            self.data_wait_s = time.perf_counter() - start
            self._workers[int(state["worker"])] = state
            self.skipped = dict(self._skipped_done + Counter(self._skipped()))
            if batch is not None:
                self._history.append((batch, self._snapshot()))
                yield batch
        self._skipped_done.update(self._skipped())
        self._epoch += 1
        self._workers = {}
        if self._history:
            self._history[-1] = (self._history[-1][0], self._snapshot())

    def _skipped(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for state in self._workers.values():
            total.update(state["skipped"])
        return dict(total)

    def _snapshot(self) -> dict[str, Any]:
        workers = {int(w): s for w, s in self._workers.items()}
        return {"epoch": self._epoch, "workers": workers, "skipped_done": dict(self._skipped_done)}

    def mark_consumed(self, batch: PackedBatch) -> None:
        """Declare `batch` (an object this loader yielded) consumed: `state_dict()` resumes after it."""
        for item, snapshot in self._history:
            if item is batch:
                self._consumed = snapshot
                while self._history and self._history[0][0] is not batch:
                    self._history.popleft()
                return

    def _local_state(self) -> dict[str, Any]:
        stream: PackedStream = self.dataset  # type: ignore[assignment]
        snapshot = self._consumed if self._consumed is not None else self._snapshot()
        return {
            **snapshot,
            "num_workers": self.num_workers,
            "rank": stream.rank,
            "world_size": stream.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Resume state of every rank (a collective under torch.distributed)."""
        local = self._local_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
        else:
            ranks = [local]
        return {"ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output (same world size and `num_workers` as when it was saved).

        Raises:
            ValueError: If the world size or number of workers differ from the saved ones.
        """
        stream: PackedStream = self.dataset  # type: ignore[assignment]
        ranks = state["ranks"]
        if len(ranks) != stream.world_size:
            raise ValueError(f"data state was saved by {len(ranks)} ranks, resuming on {stream.world_size}")
        mine = ranks[stream.rank]
        if mine["num_workers"] != self.num_workers:
            raise ValueError(
                f"data state was saved with num_workers={mine['num_workers']}, resuming with {self.num_workers}"
            )
        self._epoch = int(mine["epoch"])
        self._workers = {int(w): s for w, s in mine["workers"].items()}
        self._skipped_done = Counter(mine.get("skipped_done", {}))
        self.skipped = dict(self._skipped_done + Counter(self._skipped()))
        self._live = None
        self._consumed = None
        self._history.clear()


__all__ = ["PackedLoader", "PackedStream"]
