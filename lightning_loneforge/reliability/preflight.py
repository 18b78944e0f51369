"""Checks before training: the checkpoint folder is writable and has room for the checkpoints to come."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from torch import nn
from torch.optim import Optimizer

log = logging.getLogger(__name__)

ADAM_STATES_PER_PARAM = 2
"""Optimizer tensors per parameter assumed before the first step creates them (Adam/AdamW: exp_avg, exp_avg_sq)."""


class CheckpointDirError(OSError):
    """The checkpoint folder cannot hold checkpoints (not creatable, not writable, or too little space)."""


def check_writable(dirpath: str | Path, rank: int = 0) -> None:
    """Creates `dirpath` if needed and writes, then deletes, a probe file in it.

    Raises:
        CheckpointDirError: naming the folder and the operating system's reason.
    """
    dirpath = Path(dirpath)
    probe = dirpath / f".loneforge-write-probe-rank{rank}-{os.getpid()}"
    try:
        dirpath.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as handle:
            handle.write(b"probe")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        raise CheckpointDirError(
            f"Checkpoint folder {dirpath} is not writable ({error.strerror or error}); "
            "fix its permissions or choose another `dirpath` before training."
        ) from error


def checkpoint_bytes(module: nn.Module, optimizers: Iterable[Optimizer] = ()) -> int:
    """Estimated size of one checkpoint over all ranks: parameters plus optimizer state.

    Parameters count at their global size (a DTensor's `numel()` is global); optimizer state that does not
    exist yet is assumed to be Adam's two tensors per parameter.
    """
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    state_bytes = 0
    for optimizer in optimizers:
        for state in optimizer.state.values():
            state_bytes += sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel"))
    if state_bytes == 0:
        state_bytes = ADAM_STATES_PER_PARAM * sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)
    return param_bytes + state_bytes


def check_free_space(
    dirpath: str | Path, module: nn.Module, optimizers: Iterable[Optimizer] = (), copies: int = 1
) -> int:
    """Raises when `dirpath`'s file system has less room than one checkpoint; returns the estimated size.

    `copies` (kept checkpoints + the one being written) is what it needs to run for long; less than that
    but more than one checkpoint is allowed (the oldest is deleted after each save).

    Raises:
        CheckpointDirError: with the estimated size and the free space.
    """
    needed = checkpoint_bytes(module, optimizers)
    free = shutil.disk_usage(dirpath).free
    if free < needed:
        raise CheckpointDirError(
            f"Checkpoint folder {dirpath} has {free / 2**30:.2f} GiB free, but one checkpoint needs about "
            f"{needed / 2**30:.2f} GiB ({copies} copies are kept while writing); free space or choose another `dirpath`."
        )
    if free < copies * needed:
        log.warning(
            f"Checkpoint folder {dirpath} has {free / 2**30:.2f} GiB free; keeping {copies} checkpoints of about "
            f"{needed / 2**30:.2f} GiB may fill it (a failed save keeps the previous checkpoints usable)."
        )
    return needed
