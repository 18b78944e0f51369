"""Bad steps: a non-finite loss or gradient is caught, then raised (with where it happened) or skipped.

Before every optimizer step, one small device tensor is built: `[loss not finite, tower_1 grads not finite,
...]` (per-tower gradient norms of the local shards through `torch._foreach_norm`; no collective, no host
sync). What happens next depends on the policy:

- `raise`: the flags of each step are kept on the device and checked together every `check_every_n_steps`
  steps (default: the trainer's `log_every_n_steps`, when Lightning syncs for logging anyway), before every
  checkpoint is written (so no checkpoint holds the damage) and at the end of training: one all-reduce and one
  host sync per check. The error names the first bad step, its batch's sample keys and the towers.
- `skip`: the step's flags are all-reduced and read at once (one sync per step: the decision must come before
  the optimizer runs); a bad step drops every gradient, so the optimizer leaves weights and moments unchanged
  (the LR schedule still advances). Skips are counted, logged as `reliability/skipped_steps`, warned about
  with the step, sample keys and towers; more than `max_consecutive_skips` in a row raise.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from typing_extensions import override

log = logging.getLogger(__name__)

OTHER = "other"
"""Name given to parameters outside every tower of `model.towers()`."""


class NonFiniteStepError(RuntimeError):
    """A step's loss or gradients were not finite (policy `raise`, or too many consecutive skips)."""

    def __init__(self, message: str, step: int, sample_keys: list[str], towers: list[str], loss_bad: bool) -> None:
        super().__init__(message)
        self.step = step
        self.sample_keys = sample_keys
        self.towers = towers
        self.loss_bad = loss_bad


@dataclass
class _StepRecord:
    step: int
    sample_keys: list[str]
    flags: Tensor | None = None


def batch_sample_keys(batch: Any) -> list[str]:
    """What identifies a batch in an error: `PackedBatch.sample_keys`, a dict's `__key__`/keys, else its type."""
    keys = getattr(batch, "sample_keys", None)
    if keys:
        return [str(k) for k in keys]
    if isinstance(batch, Mapping):
        if "__key__" in batch:
            value = batch["__key__"]
            return [str(k) for k in value] if isinstance(value, (list, tuple)) else [str(value)]
        return [f"<dict with keys {sorted(map(str, batch))}>"]
    return [f"<{type(batch).__name__} without sample keys>"]


def tower_groups(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by tower (`module.towers()` when it has one), the rest under `"other"`."""
    groups: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    towers = module.towers() if callable(getattr(module, "towers", None)) else {}
    for name, tower in towers.items():
        params = [p for p in tower.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        groups[name] = params
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
    if rest or not groups:
        groups[OTHER] = rest
    return groups


def _local(grad: Tensor) -> Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


def nonfinite_flags(loss_bad: Tensor, groups: Mapping[str, list[nn.Parameter]], device: torch.device) -> Tensor:
    """`[loss bad, tower_1 bad, ...]` as a float tensor on `device`, from this rank's gradient shards (no sync)."""
    flags = [loss_bad.to(device=device, dtype=torch.float32).reshape(())]
    for params in groups.values():
        grads = [_local(p.grad) for p in params if p.grad is not None]
        grads = [g for g in grads if g.numel()]
        if not grads:
            flags.append(torch.zeros((), device=device))
            continue
        total = torch.stack([n.to(device=device, dtype=torch.float32) for n in torch._foreach_norm(grads)]).sum()
        flags.append((~torch.isfinite(total)).float())
    return torch.stack(flags)


def _all_reduce_max(flags: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


class BadStepGuard(Callback):
    """Detects non-finite losses and gradient norms per tower; raises or skips the optimizer step.

    Args:
        policy: `"raise"` or `"skip"` (see the module docstring for the cost of each).
        max_consecutive_skips: With `skip`, raise after more bad steps in a row than this.
        check_every_n_steps: With `raise`, steps between checks; None uses the trainer's `log_every_n_steps`.
    """

    def __init__(
        self,
        policy: Literal["raise", "skip"] = "raise",
        max_consecutive_skips: int = 3,
        check_every_n_steps: int | None = None,
    ) -> None:
        if policy not in ("raise", "skip"):
            raise ValueError(f"BadStepGuard(policy={policy!r}): expected 'raise' or 'skip'.")
        if max_consecutive_skips < 0:
            raise ValueError(f"BadStepGuard(max_consecutive_skips={max_consecutive_skips}): must be >= 0.")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.check_every_n_steps = check_every_n_steps
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._groups: dict[str, list[nn.Parameter]] = {}
        self._pending: deque[_StepRecord] = deque()
        self._current: _StepRecord | None = None
        self._loss_bad: Tensor | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._groups = tower_groups(pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._current is None:
            self._current = _StepRecord(trainer.global_step, batch_sample_keys(batch))
        else:  # gradient accumulation: later micro-batches of the same step
            self._current.sample_keys.extend(batch_sample_keys(batch))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        record = self._current or _StepRecord(trainer.global_step, [])
        self._current = None
        device = trainer.strategy.root_device
        loss_bad = self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=torch.bool)
        self._loss_bad = None
        record.flags = nonfinite_flags(loss_bad, self._groups, device)
        if self.policy == "skip":
            self._decide_skip(trainer, pl_module, record)
        else:
            self._pending.append(record)

    def _decide_skip(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: _StepRecord) -> None:
        assert record.flags is not None
        flags = _all_reduce_max(record.flags).cpu()
        if not bool(flags.any()):
            self.consecutive_skips = 0
            return
        for param in pl_module.parameters():
            param.grad = None
        self.skipped_steps += 1
        self.consecutive_skips += 1
        message = self._describe(record, flags)
        if self.consecutive_skips > self.max_consecutive_skips:
            raise self._error(
                f"{self.consecutive_skips} consecutive non-finite steps (max_consecutive_skips="
                f"{self.max_consecutive_skips}); last: {message}",
                record,
                flags,
            )
        log.warning(f"Skipped optimizer step ({self.skipped_steps} so far): {message}")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.policy == "skip":
            pl_module.log("reliability/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            return
        every = self.check_every_n_steps or max(trainer.log_every_n_steps, 1)
        if trainer.global_step % every == 0:
            self.check(trainer)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.check(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: pl.Trainer) -> None:
        """Reads the flags of the steps since the last check (one all-reduce, one sync); raises on the first bad one."""
        if not self._pending:
            return
        records = list(self._pending)
        self._pending.clear()
        flags = _all_reduce_max(torch.stack([r.flags for r in records if r.flags is not None])).cpu()
        for record, row in zip(records, flags, strict=True):
            if bool(row.any()):
                raise self._error(f"Non-finite training step: {self._describe(record, row)}", record, row)

    def _bad_towers(self, flags: Tensor) -> list[str]:
        return [name for name, bad in zip(self._groups, flags[1:].tolist(), strict=True) if bad]

    def _describe(self, record: _StepRecord, flags: Tensor) -> str:
        towers = self._bad_towers(flags)
        what = "loss non-finite" if bool(flags[0]) else "loss finite"
        grads = f"non-finite gradients in towers {towers}" if towers else "gradients finite"
        keys = record.sample_keys
        shown = keys if len(keys) <= 8 else [*keys[:8], f"... ({len(keys)} samples)"]
        return f"step {record.step}: {what}, {grads}; batch sample keys {shown}"

    def _error(self, message: str, record: _StepRecord, flags: Tensor) -> NonFiniteStepError:
        return NonFiniteStepError(message, record.step, record.sample_keys, self._bad_towers(flags), bool(flags[0]))
