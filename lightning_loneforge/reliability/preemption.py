"""Preemption: SIGTERM / SIGUSR1 -> a complete checkpoint at the next step boundary, then exit with code 75.

Schedulers warn before they kill: SLURM sends SIGTERM (or the `--signal` of the job, often SIGUSR1) some
time before SIGKILL, Kubernetes sends SIGTERM and waits `terminationGracePeriodSeconds`, torchrun forwards
SIGTERM to every worker. The handler only records the signal; at the end of the current optimizer step the
ranks agree (any rank that got a signal stops all), save atomically, and raise `Preempted`, a
`SystemExit(75)` (75 = `EX_TEMPFAIL`, "try again"), so a wrapper script can requeue on exit code 75 and
resume with `ckpt_path="last"`.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_loneforge.reliability.checkpointing import ReliableCheckpoint, find_checkpoint_callback

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run stopped by a preemption signal after saving (`EX_TEMPFAIL` of sysexits.h)."""


class Preempted(SIGTERMException):
    """Raised at a step boundary after the preemption checkpoint is complete; exits with `PREEMPTED_EXIT_CODE`.

    A `SystemExit` like Lightning's own `SIGTERMException`, so Lightning runs its `on_exception` hooks,
    finalizes loggers and tears down before the process exits with the code.
    """

    def __init__(self, step: int, checkpoint: str, code: int = PREEMPTED_EXIT_CODE) -> None:
        super().__init__(code)
        self.step = step
        self.checkpoint = checkpoint


class PreemptionCheckpoint(Callback):
    """On SIGTERM/SIGUSR1: save a complete checkpoint at the next step boundary and exit with code 75.

    Replaces Lightning's SIGTERM handler while training (Lightning's only reacts to a signal on rank 0 and
    saves nothing); the previous handlers come back at the end of `fit`. The ranks agree through one boolean
    all-reduce every `check_every_n_steps` optimizer steps, so a signal that reaches only some ranks stops all
    of them at the same step.

    The checkpoint goes through the trainer's `ReliableCheckpoint` (its folder and naming, atomic, waits for an
    async save in flight); without one it is written atomically to `<default_root_dir>/checkpoints`.

    Args:
        signals: Signal names to handle.
        check_every_n_steps: Steps between the cross-rank checks (each check is a tiny all-reduce and a host sync).
        exit_code: Exit code of the stopped run.
    """

    def __init__(
        self,
        signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1"),
        check_every_n_steps: int = 1,
        exit_code: int = PREEMPTED_EXIT_CODE,
    ) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"PreemptionCheckpoint(check_every_n_steps={check_every_n_steps}): must be >= 1.")
        unknown = [name for name in signals if not hasattr(signal, name)]
        if unknown:
            raise ValueError(f"PreemptionCheckpoint(signals=...): unknown signal names {unknown}.")
        self.signals = [getattr(signal, name) for name in signals]
        self.check_every_n_steps = check_every_n_steps
        self.exit_code = exit_code
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._fallback: ReliableCheckpoint | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning's `_SignalConnector.register_signal_handlers`, which runs once setup is done
        self.received = None
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.check_every_n_steps:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        path = self._save(trainer)
        log.warning(f"Preempted by {name}: saved {path} at step {trainer.global_step}; exiting with {self.exit_code}.")
        raise Preempted(trainer.global_step, path, self.exit_code)

    def _save(self, trainer: pl.Trainer) -> str:
        callback = find_checkpoint_callback(trainer)
        if callback is None:
            if self._fallback is None:
                self._fallback = ReliableCheckpoint(dirpath=Path(trainer.default_root_dir) / "checkpoints")
                self._fallback.setup(trainer, trainer.lightning_module, "fit")
            callback = self._fallback
        path = callback.checkpoint_path_for(trainer)
        callback.save_atomic(trainer, path, allow_async=False)
        return path

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler)
        self._previous = {}
