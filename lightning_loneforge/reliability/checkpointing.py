"""Atomic checkpoints: write under a temporary name, mark complete, rename; resume from the newest complete one.

A checkpoint (a sharded DCP folder or a single file) is written as `<name>.partial`. When every rank has
written its part, rank 0 adds a `COMPLETE` marker (folders) and renames it to `<name>`. A crash at any
moment leaves either the previous checkpoints untouched beside a `.partial` leftover, or a complete new one.
`ckpt_path="last"` resolves to the newest complete checkpoint; leftovers are removed when the next run starts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from lightning_loneforge.reliability.preflight import check_free_space, check_writable

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
"""File inside a checkpoint folder, written after every rank's shard and the metadata."""
PARTIAL_SUFFIX = ".partial"
"""Suffix of a checkpoint being written; it is renamed away once complete."""
_ASIDE_SUFFIX = ".replaced"


def is_complete(path: str | Path) -> bool:
    """True for a finished checkpoint: a folder with the `COMPLETE` marker, or a file under its final name."""
    path = Path(path)
    if path.name.endswith((PARTIAL_SUFFIX, _ASIDE_SUFFIX)):
        return False
    if path.is_dir():
        return (path / COMPLETE_MARKER).is_file()
    return path.is_file() and path.suffix == ".ckpt"


def _finished_at(path: Path) -> int:
    marker = path / COMPLETE_MARKER if path.is_dir() else path
    return marker.stat().st_mtime_ns


def complete_checkpoints(dirpath: str | Path) -> list[Path]:
    """Complete checkpoints in `dirpath`, oldest first (by the time they were completed)."""
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return []
    found = [path for path in dirpath.iterdir() if is_complete(path)]
    return sorted(found, key=lambda path: (_finished_at(path), path.name))


def newest_complete_checkpoint(dirpath: str | Path) -> Path | None:
    """The checkpoint `ckpt_path="last"` and `--resume auto` resume from, or None when there is none."""
    found = complete_checkpoints(dirpath)
    return found[-1] if found else None


def resolve_resume(resume: str | None, dirpath: str | Path) -> str | None:
    """`"auto"` -> the newest complete checkpoint in `dirpath` (None on a first run); any other value unchanged."""
    if resume != "auto":
        return resume
    newest = newest_complete_checkpoint(dirpath)
    return str(newest) if newest is not None else None


def remove_path(path: str | Path) -> None:
    """Removes a checkpoint file or folder (no error when it is gone)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(partial: Path, final: Path, info: dict[str, Any]) -> None:
    """Marks `partial` complete and renames it to `final` (called on rank 0 after every rank wrote its part).

    A folder gets the `COMPLETE` marker (a small JSON of `info`) first. An existing `final` is moved aside,
    replaced, then deleted, so a complete checkpoint exists under some name at every moment.
    """
    if not partial.exists():
        raise FileNotFoundError(f"Checkpoint {partial} was not written; nothing to commit.")
    if partial.is_dir():
        marker = partial / COMPLETE_MARKER
        with marker.open("w") as handle:
            json.dump(info, handle)
            handle.flush()
            os.fsync(handle.fileno())
    aside = None
    if final.exists():
        if final.is_dir() or partial.is_dir():
            aside = final.with_name(final.name + _ASIDE_SUFFIX)
            remove_path(aside)
            os.replace(final, aside)
    os.replace(partial, final)
    _fsync_dir(final.parent)
    if aside is not None:
        remove_path(aside)


def remove_leftovers(dirpath: str | Path) -> list[Path]:
    """Deletes `.partial` checkpoints of crashed runs; returns what it removed."""
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return []
    removed = []
    for path in dirpath.iterdir():
        if path.name.endswith((PARTIAL_SUFFIX, _ASIDE_SUFFIX)):
            remove_path(path)
            removed.append(path)
    return removed


@dataclass
class _PendingSave:
    future: Future
    partial: Path
    final: Path
    info: dict[str, Any]
    started: float


class ReliableCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose checkpoints are atomic, pruned to the newest `keep_last_k`, optionally async.

    - Every save goes to `<name>.partial` and is renamed to `<name>` once all ranks wrote their part (folders
      get a `COMPLETE` marker first); a crash or a failed write leaves the previous checkpoints usable.
    - `trainer.fit(ckpt_path="last")` resumes from the newest *complete* checkpoint in `dirpath`.
    - `setup` fails before training when `dirpath` is not writable; `on_train_start` when the free space
      is below one checkpoint's estimated size. Leftover `.partial` checkpoints are removed.
    - `async_save=True` (sharded DCP checkpoints only) stages the state into CPU memory, then writes it in a
      background thread with `torch.distributed.checkpoint.async_save` over a separate gloo group; the rename
      happens when the write finished, at a later step boundary, before the next save, or at the end.

    Args:
        dirpath, filename, every_n_train_steps, ...: As in `ModelCheckpoint` (the default name is `step=XXXXXXXX`).
        keep_last_k: Keep the newest k complete checkpoints (None keeps all). Only with `monitor=None`;
            with a monitor, use `save_top_k`.
        async_save: Write sharded checkpoints in the background.
        **kwargs: Further `ModelCheckpoint` arguments.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str | None = "{step:08d}",
        every_n_train_steps: int | None = None,
        keep_last_k: int | None = 3,
        async_save: bool = False,
        **kwargs: Any,
    ) -> None:
        monitor = kwargs.get("monitor")
        if keep_last_k is not None:
            if keep_last_k < 1:
                raise ValueError(f"ReliableCheckpoint(keep_last_k={keep_last_k}): must be >= 1 or None.")
            if monitor is not None:
                raise ValueError(
                    "ReliableCheckpoint(keep_last_k=...) keeps the newest checkpoints and needs monitor=None; "
                    f"with monitor={monitor!r} use save_top_k instead."
                )
            kwargs["save_top_k"] = -1
        super().__init__(dirpath=dirpath, filename=filename, every_n_train_steps=every_n_train_steps, **kwargs)
        self.keep_last_k = keep_last_k
        self.async_save = async_save
        self._pending: _PendingSave | None = None
        self._async_group: Any = None
        self.async_stall_s: list[float] = []
        """Seconds each async save held the training loop (dump + CPU staging), for benchmarks."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.dirpath is None:
            return
        check_writable(self.dirpath, rank=trainer.global_rank)
        if trainer.is_global_zero:
            for path in remove_leftovers(self.dirpath):
                log.warning(f"Removed an unfinished checkpoint of an earlier run: {path}")
        if self.async_save and dist.is_available() and dist.is_initialized() and self._async_group is None:
            timeout = getattr(trainer.strategy, "_timeout", timedelta(minutes=30))
            self._async_group = dist.new_group(backend="gloo", timeout=timeout)
        trainer.strategy.barrier("ReliableCheckpoint.setup")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.dirpath is not None and trainer.is_global_zero:
            copies = (self.keep_last_k or 1) + 1
            check_free_space(self.dirpath, pl_module, trainer.optimizers, copies=copies)

    @override
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        dirpath = self.dirpath or self._ModelCheckpoint__resolve_ckpt_dir(trainer)  # type: ignore[attr-defined]
        newest = newest_complete_checkpoint(dirpath)
        return {str(newest)} if newest is not None else set()

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self.save_atomic(trainer, filepath)

    def save_atomic(self, trainer: pl.Trainer, filepath: str | Path, allow_async: bool = True) -> None:
        """Saves to `filepath` atomically (a collective: every rank calls it at the same step)."""
        final = Path(filepath)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        self.finish_pending(trainer, wait=True)
        if trainer.is_global_zero:
            remove_path(partial)
        trainer.strategy.barrier("ReliableCheckpoint.prepare")
        info = {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "world_size": trainer.world_size}
        if allow_async and self.async_save and _sharded_dcp(trainer):
            self._start_async(trainer, partial, final, info)
        else:
            trainer.save_checkpoint(partial, self.save_weights_only)
            if trainer.is_global_zero:
                commit(partial, final, info)
                self._prune(final)
            trainer.strategy.barrier("ReliableCheckpoint.commit")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = str(final)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def checkpoint_path_for(self, trainer: pl.Trainer) -> str:
        """The path the current step's checkpoint gets (as `ModelCheckpoint` would name it)."""
        candidates = self._monitor_candidates(trainer)
        return self._get_metric_interpolated_filepath_name(candidates, trainer)

    def _start_async(self, trainer: pl.Trainer, partial: Path, final: Path, info: dict[str, Any]) -> None:
        from torch.distributed.checkpoint import async_save

        started = time.perf_counter()
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        if trainer.is_global_zero:
            partial.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, partial / _METADATA_FILENAME)
        future = async_save(state, checkpoint_id=partial, process_group=self._async_group)
        self.async_stall_s.append(time.perf_counter() - started)
        self._pending = _PendingSave(future, partial, final, info, started)

    def finish_pending(self, trainer: pl.Trainer, wait: bool) -> None:
        """Commits a finished background save (waits for it when `wait`); a failed one raises, naming the path."""
        pending = self._pending
        if pending is None or (not wait and not pending.future.done()):
            return
        self._pending = None
        try:
            pending.future.result(timeout=_timeout_s(trainer))
        except Exception as error:
            if trainer.is_global_zero:
                remove_path(pending.partial)
            raise RuntimeError(
                f"Asynchronous checkpoint save to {pending.final} failed; the previous checkpoints are intact."
            ) from error
        if trainer.is_global_zero:
            commit(pending.partial, pending.final, pending.info)
            self._prune(pending.final)
            log.info(f"Checkpoint {pending.final} complete ({time.perf_counter() - pending.started:.2f} s)")

    def _prune(self, newest: Path) -> None:
        if self.keep_last_k is None or self.dirpath is None:
            return
        found = [path for path in complete_checkpoints(self.dirpath) if path != newest] + [newest]
        for path in found[: -self.keep_last_k]:
            remove_path(path)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        self.finish_pending(trainer, wait=False)
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.finish_pending(trainer, wait=True)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            self.finish_pending(trainer, wait=True)
        except Exception as error:
            log.error(f"{error} ({error.__cause__})")


def _sharded_dcp(trainer: pl.Trainer) -> bool:
    strategy = trainer.strategy
    return isinstance(strategy, ModelParallelStrategy) and bool(strategy._save_distributed_checkpoint)


def _timeout_s(trainer: pl.Trainer) -> float:
    timeout = getattr(trainer.strategy, "_timeout", None)
    return timeout.total_seconds() if isinstance(timeout, timedelta) else 1800.0


def find_checkpoint_callback(trainer: pl.Trainer) -> ReliableCheckpoint | None:
    """The trainer's `ReliableCheckpoint`, if it has one."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, ReliableCheckpoint)), None)
