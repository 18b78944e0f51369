"""Reliability: atomic checkpoints, preemption, dead ranks, bad steps, checkpoint-folder preflight.

Each part is a Lightning `Callback`; `reliability_callbacks()` gives the usual set.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.callbacks import Callback

from lightning_loneforge.reliability.bad_steps import BadStepGuard, NonFiniteStepError
from lightning_loneforge.reliability.checkpointing import (
    COMPLETE_MARKER,
    PARTIAL_SUFFIX,
    ReliableCheckpoint,
    complete_checkpoints,
    newest_complete_checkpoint,
    resolve_resume,
)
from lightning_loneforge.reliability.dead_rank import RankHeartbeat
from lightning_loneforge.reliability.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionCheckpoint
from lightning_loneforge.reliability.preflight import CheckpointDirError, check_writable
from lightning_loneforge.reliability.resume import translate_resume_args

__all__ = [
    "BadStepGuard",
    "COMPLETE_MARKER",
    "CheckpointDirError",
    "NonFiniteStepError",
    "PARTIAL_SUFFIX",
    "PREEMPTED_EXIT_CODE",
    "Preempted",
    "PreemptionCheckpoint",
    "RankHeartbeat",
    "ReliableCheckpoint",
    "check_writable",
    "complete_checkpoints",
    "newest_complete_checkpoint",
    "reliability_callbacks",
    "resolve_resume",
    "translate_resume_args",
]


def reliability_callbacks(
    dirpath: str | None = None,
    every_n_train_steps: int = 500,
    keep_last_k: int = 3,
    async_save: bool = False,
    bad_steps: Literal["raise", "skip"] = "raise",
    **checkpoint_kwargs: Any,
) -> list[Callback]:
    """Atomic checkpoints every `every_n_train_steps`, preemption save, heartbeat, bad-step guard."""
    return [
        ReliableCheckpoint(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            keep_last_k=keep_last_k,
            async_save=async_save,
            **checkpoint_kwargs,
        ),
        PreemptionCheckpoint(),
        RankHeartbeat(),
        BadStepGuard(policy=bad_steps),
    ]
